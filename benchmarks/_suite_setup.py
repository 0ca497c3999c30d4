"""GPU suite, setup: install the prepared wheels offline, make this tree's rrhf_lite and
rrhf_kernels importable, and record what is installed (benchmarks/README.md, "Preparing the
wheels"). Nothing of the project or the wheels is imported at module level: they are not
importable until install_wheels and ensure_project_importable have run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WHEEL_DIR = ROOT / ".whl"
SITE_DIR = Path(tempfile.gettempdir()) / "rrhf_suite_site"
# one link folder per checkout, so suites run from two trees at once do not fight over it
LINK_DIR = Path(tempfile.gettempdir()) / (
    "rrhf_suite_path_" + hashlib.sha1(str(ROOT).encode()).hexdigest()[:10])
WHEELS = ("bitsandbytes==0.50.2", "transformers==5.24.0", "peft==0.21.2", "liger-kernel==0.8.5",
          "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")
VERSIONED = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "trl",
             "datasets", "liger_kernel")


def install_wheels(wheel_dir: Path, target: Path = SITE_DIR) -> dict[str, Any]:
    """pip-install every wheel of `wheel_dir` into `target` (offline) and put it first on paths."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    info: dict[str, Any] = {"wheel_dir": str(wheel_dir), "wheels": [w.name for w in wheels]}
    if not wheels:
        info["note"] = "no wheels found: using what is installed"
        return info
    marker = target / ".installed"
    listing = "\n".join(info["wheels"])
    if not (marker.is_file() and marker.read_text() == listing):  # a rerun on a warm machine
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
               *map(str, wheels)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        info["install_s"] = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"pip install of {wheel_dir} failed:\n{proc.stderr[-2000:]}")
        marker.write_text(listing)
    _prepend_path(target)
    expected = {w.split("==")[0].replace("-", "_").lower() for w in WHEELS}
    have = {w.name.split("-")[0].lower() for w in wheels}
    info["missing_from_wheel_dir"] = sorted(expected - have)
    info["dropped"] = drop_broken_optional(target)
    return info


# Optional packages (only comparisons use them) and what breaks with them. A `datasets` that
# cannot import (e.g. its pyarrow is older than it needs) would break `transformers.Trainer`,
# which imports datasets whenever it is installed: then it is removed again, with trl.
OPTIONAL_PROBES = (
    ("datasets", "import datasets", ("datasets", "trl")),
    ("trl", "import trl.trainer.utils", ("trl",)),
    ("liger_kernel", "import liger_kernel.transformers.functional", ("liger_kernel",)),
)


def drop_broken_optional(target: Path) -> dict[str, str]:
    """Import-test the optional packages installed into `target`; remove the broken ones."""
    dropped: dict[str, str] = {}
    for dist, code, remove in OPTIONAL_PROBES:
        if dist in dropped or not _dist_info(target, dist):
            continue
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ), timeout=120)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
            for name in remove:
                if _remove_dist(target, name):
                    dropped[name] = f"{code!r} failed: {reason}"
    if dropped:
        importlib.invalidate_caches()
        print(f"[suite] removed optional packages that do not import here: {dropped}", flush=True)
    return dropped


def _dist_info(target: Path, dist: str) -> Path | None:
    norm = dist.replace("-", "_").lower()
    return next((d for d in target.glob("*.dist-info")
                 if d.name.split("-")[0].replace("-", "_").lower() == norm), None)


def _remove_dist(target: Path, dist: str) -> bool:
    """Delete an installed distribution's files (from its RECORD) and its dist-info folder."""
    import shutil

    info = _dist_info(target, dist)
    if info is None:
        return False
    record = info / "RECORD"
    lines = record.read_text(encoding="utf-8").splitlines() if record.is_file() else []
    tops = set()
    for line in lines:
        path = line.split(",", 1)[0]
        if not path or path.startswith(".."):
            continue
        top = path.split("/", 1)[0]
        if top == "bin" or "/" not in path:  # shared script folder, top-level modules
            (target / path).unlink(missing_ok=True)
        elif top != info.name:
            tops.add(top)
    for top in sorted(tops):
        shutil.rmtree(target / top, ignore_errors=True)
    shutil.rmtree(info, ignore_errors=True)
    return True


def _prepend_path(folder: Path) -> None:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(folder) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), *parts])
    importlib.invalidate_caches()


def ensure_project_importable() -> dict[str, str]:
    """rrhf_lite and rrhf_kernels from THIS tree (installed or not), via links in a temp dir.

    Links, not the repository root: the root on sys.path would make its kernels/ folder an
    (empty) namespace package named `kernels` where Hugging Face's package is not installed.
    """
    wanted = {"rrhf_kernels": ROOT / "kernels" / "rrhf_kernels", "rrhf_lite": ROOT / "rrhf_lite"}
    found = {}
    for name, folder in wanted.items():
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve().parent if spec and spec.origin else None
        if origin != folder.resolve():
            LINK_DIR.mkdir(parents=True, exist_ok=True)
            tmp = LINK_DIR / f".{name}.{os.getpid()}"
            tmp.symlink_to(folder.resolve(), target_is_directory=True)
            os.replace(tmp, LINK_DIR / name)  # atomic: a concurrent run never sees no link
            _prepend_path(LINK_DIR)
        found[name] = str(folder)
    return found



def versions(commit: str | None = None) -> dict[str, Any]:
    """Python, package and CUDA versions, rrhf_lite's version and the git commit (or `commit`)."""
    import rrhf_lite
    from rrhf_lite.utils.report_files import collect_environment, cuda_device

    out = collect_environment(VERSIONED)
    out["cuda"] = cuda_device()[1]
    out["rrhf_lite"] = rrhf_lite.__version__
    out["git_commit"] = _git("rev-parse", "HEAD") or commit
    status = _git("status", "--porcelain")
    out["git_dirty"] = None if status is None else bool(status)
    return out


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None

