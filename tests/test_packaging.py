"""The install layout: every package is listed, and kernels/ imports as rrhf_kernels."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "rrhf_lite").rglob("__init__.py")
    }
    missing = found - listed
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_kernels_install_as_rrhf_kernels_not_kernels(tmp_path):
    # Run from an empty directory so the repository root is not on sys.path by accident.
    import subprocess
    import sys

    code = (
        "import importlib.util, rrhf_kernels;"
        "s = importlib.util.find_spec('kernels');"
        "print(rrhf_kernels.__file__); print(s.origin if s else None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    ours, theirs = out.stdout.split("\n")[:2]
    assert Path(ours).resolve().parent == ROOT / "kernels"
    # Hugging Face's `kernels` may or may not be installed; ours must never be what answers.
    assert theirs == "None" or Path(theirs).resolve().parent != ROOT / "kernels"


def test_tiny_tokenizer_round_trips_text(char_tokenizer):
    text = "Add 2+3 =\n 5!"
    ids = char_tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert char_tokenizer.decode(ids) == text
    assert char_tokenizer.eos_token_id == 2 and char_tokenizer.pad_token_id == 0
