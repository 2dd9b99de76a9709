"""Benchmark tasks: prompts (token ids), how long to generate, and how to score a completion.

Two tasks are built from the demo pair's held-out standard-library modules (adasd_core.demo.data):
- next-line: the prompt ends at the end of a source line; a completion is correct iff it starts
  with the line break and its first line equals the file's next line exactly (accuracy task);
- continuation: a window of a module, continued for a fixed number of tokens (speed and fidelity).
GSM8K, HumanEval and MMLU come from local JSONL files (adasd_core.bench.evals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Prompt:
    id: str
    ids: list[int]
    reference: str | None = None  # what a correct completion contains (task-specific)
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    name: str
    prompts: list[Prompt]
    max_tokens: int
    repeats: int
    score: Callable[[Prompt, str], float] | None = None  # completion text -> 0..1; None: speed only
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    skipped: int = 0  # prompts left out because prompt + max_tokens exceed the context
    notes: str = ""

    @property
    def scored(self) -> bool:
        return self.score is not None


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def _evenly(items: list, n: int) -> list:
    """n items spread evenly over the list, in order (all of them when n >= len)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


# ----------------------------------------------------------------------------- next-line


def score_next_line(prompt: Prompt, completion: str) -> float:
    """1.0 iff the completion is '\\n' + the reference line + a line break (the line is finished)."""
    if not completion.startswith("\n"):
        return 0.0
    body = completion[1:]
    if "\n" not in body:
        return 0.0  # cut off before the line ended: it could still differ
    return float(body.split("\n", 1)[0] == prompt.reference)


def next_line_task(tokenizer, sources: list[tuple[str, str]], n_prompts: int, context_tokens: int, max_tokens: int,
                   context_length: int, repeats: int = 1) -> Task:
    """Prompts that end at the end of a line (before its line break) of a held-out module.

    The prompt stops on a token boundary of the whole file's tokenization, so the model sees the
    tokens it was trained on; the line break (and the next line's indentation) is the model's to
    produce. Lines kept: non-blank, no trailing space, after a non-blank line, and short enough that
    '\\n' + line + '\\n' fits in max_tokens - 1 tokens.
    """
    context_tokens = min(context_tokens, context_length - max_tokens)
    candidates: list[Prompt] = []
    for path, text in sources:
        ids, offsets = _encode_with_offsets(tokenizer, text)
        starts = {s: i for i, (s, e) in enumerate(offsets) if e > s}
        lines = text.split("\n")
        pos = 0
        for n, line in enumerate(lines):
            line_start = pos
            pos += len(line) + 1
            if n == 0 or n + 1 >= len(lines):
                continue
            prev = lines[n - 1]
            if not prev.strip() or prev != prev.rstrip() or line != line.rstrip() or len(line.strip()) < 4:
                continue
            cut = line_start - 1  # the '\n' that ends the previous line
            j = starts.get(cut)
            end = starts.get(line_start + len(line))  # the token that starts with the line's own '\n'
            if j is None or end is None or j < 8 or (end - j) + 2 > max_tokens - 1:
                continue
            candidates.append(Prompt(id=f"{path}:{n + 1}", ids=ids[max(0, j - context_tokens) : j], reference=line))
    return Task(name="next-line", prompts=_evenly(candidates, n_prompts), max_tokens=max_tokens, repeats=repeats,
                score=score_next_line,
                notes="exact match of the first generated line with the module's next line "
                      "(the completion must start with the line break and finish the line)")


# ----------------------------------------------------------------------------- continuation


def continuation_task(tokenizer, sources: list[tuple[str, str]], n_prompts: int, prompt_tokens: int, max_tokens: int,
                      context_length: int, repeats: int = 3, stride: int = 64) -> Task:
    """Windows of prompt_tokens tokens inside held-out modules (with max_tokens of the module after
    them), continued for max_tokens tokens; EOS still ends a generation."""
    prompt_tokens = min(prompt_tokens, context_length - max_tokens)
    if prompt_tokens < 8:
        raise ValueError(f"the context ({context_length} tokens) is too short for {max_tokens} new tokens")
    candidates: list[Prompt] = []
    for path, text in sources:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - prompt_tokens - max_tokens + 1, stride):
            window = ids[start : start + prompt_tokens]
            truth = tokenizer.decode(ids[start + prompt_tokens : start + prompt_tokens + max_tokens])
            candidates.append(Prompt(id=f"{path}@{start}", ids=window, reference=truth))
    return Task(name="continuation", prompts=_evenly(candidates, n_prompts), max_tokens=max_tokens, repeats=repeats,
                notes=f"{prompt_tokens}-token windows of held-out modules continued for up to {max_tokens} tokens")


def demo_sources() -> list[tuple[str, str]]:
    """The held-out standard-library modules (never trained on by the demo pair)."""
    from adasd_core.demo.data import load_corpus

    return load_corpus().held_out
