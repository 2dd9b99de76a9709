"""Training prompts for the draft, and the held-out ones it must never see.

Chat prompts are written by the target itself: given its chat template up to the start of a user
turn, an instruct model writes a plausible user message (Magpie). Code prompts come from the
standard library's own functions (outside the modules the benchmarks continue, adasd_core.demo.data's
HELD_OUT): a request to write one from its signature and docstring, or to explain its source.
Evaluation prompts (adasd_core/bench/prompts/smollm2_eval.jsonl) are written by hand; a training
prompt sharing a run of words with one of them is dropped.
"""

from __future__ import annotations

import ast
import json
import random
import re
from pathlib import Path

from adasd_core.demo.data import is_held_out, stdlib_dir

EVAL_PROMPTS = Path(__file__).parent.parent / "bench" / "prompts" / "smollm2_eval.jsonl"
_SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__", "ensurepip"}


def eval_prompts(path: Path = EVAL_PROMPTS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+", text.lower())


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


class HeldOut:
    """Rejects text that shares a run of `n` words with any evaluation prompt."""

    def __init__(self, prompts: list[str], n: int = 6):
        self.n = n
        self.grams = set().union(*(_ngrams(p, min(n, max(1, len(_words(p))))) for p in prompts)) if prompts else set()
        self.whole = {" ".join(_words(p)) for p in prompts}

    def overlaps(self, text: str) -> bool:
        if " ".join(_words(text)) in self.whole:
            return True
        return bool(_ngrams(text, self.n) & self.grams)


def _summary(doc: str) -> str | None:
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    first = re.split(r"(?<=[.!?])\s", first)[0].rstrip(".")
    words = first.split()
    if not 4 <= len(words) <= 30 or not first[0].isalpha() or ">>>" in first:
        return None
    verb = words[0]
    if verb[0].isupper() and verb.lower() == verb.lower().rstrip("s") and verb.isalpha():  # "Return" -> "returns"
        verb = verb.lower() + ("es" if verb.lower().endswith(("s", "sh", "ch", "x")) else "s")
    else:
        verb = verb[0].lower() + verb[1:]
    return " ".join([verb, *words[1:]])


def code_prompts(seed: int, n_write: int, n_explain: int, held_out: HeldOut) -> list[str]:
    """Requests about public standard-library functions, sorted then sampled with `seed`."""
    write, explain = [], []
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if _SKIP.intersection(rel[:-1]) or rel[-1].startswith("_") or is_held_out("/".join(rel)):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        lines = source.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            summary = _summary(doc) if doc else None
            args = ", ".join(a.arg for a in node.args.args)
            if summary:
                write.append(f"Write a Python function `{node.name}({args})` that {summary}.")
            body = lines[node.lineno - 1 : node.end_lineno]
            if 3 <= len(body) <= 18 and all(len(line) < 100 for line in body):
                code = "\n".join(body)
                explain.append(f"Explain what this Python function does:\n```python\n{code}\n```")
    rng = random.Random(seed)
    pick = lambda xs, k: rng.sample(xs, min(k, len(xs)))  # noqa: E731
    return [p for p in pick(write, n_write) + pick(explain, n_explain) if not held_out.overlaps(p)]
