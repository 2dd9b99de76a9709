"""Training text for the demo pair: the standard library's own Python sources.

Every Python install carries them, so the build needs no network. A fixed list of modules is
held out of training (and of the tokenizer) for evaluation and benchmarks.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Held out of training; used for held-out loss, acceptance and the benchmarks' prompts.
HELD_OUT = (
    "json/",
    "csv.py",
    "textwrap.py",
    "fractions.py",
    "statistics.py",
    "heapq.py",
    "shlex.py",
    "difflib.py",
    "queue.py",
    "sched.py",
    "graphlib.py",
    "colorsys.py",
    "bisect.py",
    "calendar.py",
)

# Test suites and vendored tools are left out: large, repetitive and unlike library code.
_SKIP_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(rel: str) -> bool:
    return any(rel == h or (h.endswith("/") and rel.startswith(h)) for h in HELD_OUT)


@dataclass(frozen=True)
class Corpus:
    train: list[tuple[str, str]]  # (relative path, source)
    held_out: list[tuple[str, str]]


def load_corpus(root: Path | None = None, max_files: int | None = None) -> Corpus:
    """Sorted, so the corpus (and everything built from it) is the same on every run."""
    root = root or stdlib_dir()
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if _SKIP_PARTS.intersection(rel.split("/")[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        (held if is_held_out(rel) else train).append((rel, text))
    if max_files is not None:
        train = train[:max_files]
        held = held[: max(2, max_files // 10)]
    if not train or not held:
        raise RuntimeError(f"no Python sources found under {root}")
    return Corpus(train=train, held_out=held)
