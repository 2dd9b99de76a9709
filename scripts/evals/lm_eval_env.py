"""A virtual environment with EleutherAI's lm-evaluation-harness, apart from the project's own.

lm-eval brings datasets, scikit-learn, sacrebleu and more, whose versions must not move the
project's pins, so it lives in its own venv under the user cache:

    ${ADASD_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/adasd}/lm-eval-<version>/

Created on first use (about a minute with a warm pip cache), reused afterwards: a marker file
written after a complete install says the venv is usable. No transformers or torch in it: lm-eval
asks the server to tokenize (its remote tokenizer, GET /tokenizer_info and POST /tokenize).

    python -m scripts.evals.lm_eval_env    # creates it if needed, prints its python
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

LM_EVAL_VERSION = "0.4.13"
REQUIREMENT = f"lm-eval[api]=={LM_EVAL_VERSION}"


def cache_dir() -> Path:
    if os.environ.get("ADASD_CACHE_DIR"):
        return Path(os.environ["ADASD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adasd"


def venv_dir() -> Path:
    return cache_dir() / f"lm-eval-{LM_EVAL_VERSION}"


def _run(args: list[str], quiet: bool) -> None:
    out = subprocess.run(args, capture_output=quiet, text=True)
    if out.returncode:
        tail = "\n".join(((out.stdout or "") + (out.stderr or "")).splitlines()[-30:])
        raise RuntimeError(f"{' '.join(args)} failed with exit status {out.returncode}:\n{tail}")


def ensure(quiet: bool = True) -> Path:
    """The venv's python, installing lm-eval first if the venv is absent or incomplete."""
    root = venv_dir()
    python, marker = root / "bin" / "python", root / ".adasd-installed"
    if marker.is_file() and python.exists():
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions at once: one installs, the other waits
        if not (marker.is_file() and python.exists()):
            _install(root, python, marker, quiet)
    return python


def _install(root: Path, python: Path, marker: Path, quiet: bool) -> None:
    shutil.rmtree(root, ignore_errors=True)  # a half-finished install from an interrupted run
    # made from the base interpreter (a venv made from a venv's python is based on its base): nothing of the
    # project's packages is visible in it
    _run([sys.executable, "-m", "venv", str(root)], quiet)
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", REQUIREMENT], quiet)
    _run([str(python), "-c", "import lm_eval, aiohttp, tenacity, requests"], quiet)
    marker.write_text(REQUIREMENT + "\n")


if __name__ == "__main__":
    print(ensure(quiet="-v" not in sys.argv))
