"""The install layout: every package is listed, and kernels/rrhf_kernels/ imports as rrhf_kernels
only (never as a top-level `kernels`, Hugging Face's package name)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "rrhf_lite").rglob("__init__.py")
    }
    missing = found - listed
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def _run(code: str, cwd: Path, *path_first: Path, site_packages: bool = True) -> list[str]:
    """Run `code` in a fresh interpreter with `path_first` at the front of sys.path
    (and without site-packages if asked: -S, so an installed `kernels` cannot answer)."""
    import subprocess
    import sys

    prelude = "import sys; sys.path[:0] = %r;" % [str(p) for p in path_first]
    flags = [] if site_packages else ["-S"]
    out = subprocess.run([sys.executable, *flags, "-c", prelude + code], cwd=cwd,
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_kernels_install_as_rrhf_kernels(tmp_path):
    # From an empty directory, so the repository root is not on sys.path by accident.
    (ours,) = _run("import rrhf_kernels; print(rrhf_kernels.__file__)", tmp_path)
    assert Path(ours).resolve().parent == ROOT / "kernels" / "rrhf_kernels"


# What bitsandbytes does on a CPU with AVX512-BF16: `from kernels import get_kernel`.
_IMPORT_KERNELS = (
    "import kernels;"
    "print(getattr(kernels, '__file__', None));"
    "print(hasattr(kernels, 'candidate_logprobs'));"
    "print(hasattr(kernels, 'get_kernel'))"
)


def test_repo_root_first_on_sys_path_does_not_shadow_hf_kernels(tmp_path):
    """With Hugging Face's `kernels` installed, the checkout's kernels/ folder never wins."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("def get_kernel(*args, **kwargs): ...\n")
    where, ours, theirs = _run(_IMPORT_KERNELS, tmp_path, ROOT, site, site_packages=False)
    assert Path(where).resolve() == (site / "kernels" / "__init__.py").resolve()
    assert ours == "False" and theirs == "True"


def test_repo_root_first_on_sys_path_gives_no_kernels_module_of_ours(tmp_path):
    """Without Hugging Face's `kernels`, `import kernels` finds none of our code.

    kernels/ has no __init__.py, so at most Python makes it an empty namespace package (no
    file, no attributes): bitsandbytes' `from kernels import get_kernel` then fails as if the
    package were not installed, and nothing of rrhf_kernels is reachable under that name.
    """
    where, ours, theirs = _run(_IMPORT_KERNELS, tmp_path, ROOT, site_packages=False)
    assert where == "None" and ours == "False" and theirs == "False"
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_tiny_tokenizer_round_trips_text(char_tokenizer):
    text = "Add 2+3 =\n 5!"
    ids = char_tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert char_tokenizer.decode(ids) == text
    assert char_tokenizer.eos_token_id == 2 and char_tokenizer.pad_token_id == 0
