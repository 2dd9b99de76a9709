"""Benchmark tasks: prompts (token ids), how long to generate, and how to score a completion.

Two tasks are built from the demo pair's held-out standard-library modules (adasd_core.demo.data):
- next-line: the prompt ends where a source line's code starts (after its indentation); a
  completion is correct iff it is exactly the rest of that line, ended by a line break (accuracy);
- continuation: a window of a module, continued for a fixed number of tokens (speed and fidelity).
GSM8K, HumanEval and MMLU come from local JSONL files (adasd_core.bench.evals).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field


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
    # (prompt, completion) -> 0..1, None: speed only. The completion runs up to and including the
    # first stop string (the scorer cuts it off), or to the last token when no stop string came.
    score: Callable[[Prompt, str], float] | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    skipped: int = 0  # prompts left out because prompt + max_tokens exceed the context
    notes: str = ""

    @property
    def scored(self) -> bool:
        return self.score is not None


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


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
    """1.0 iff the completion is the rest of the line, then a line break (the line is finished)."""
    if "\n" not in completion:
        return 0.0  # cut off before the line ended: it could still differ
    return float(completion.split("\n", 1)[0] == prompt.reference)


def next_line_task(tokenizer, sources: list[tuple[str, str]], n_prompts: int, context_tokens: int, max_tokens: int,
                   context_length: int, repeats: int = 1) -> Task:
    """Prompts that end where a held-out module's line starts, as an editor's cursor would: after
    the line break and the indentation, on a token boundary of the whole file's tokenization (so
    the model sees the tokens it was trained on; with a byte-level BPE the last indentation space
    belongs to the first word). The reference is the rest of the line; generation stops at the
    line break. Lines kept: at least 4 non-blank characters, no trailing space, and short enough
    that the rest of the line plus the line break fits in max_tokens - 1 tokens.
    """
    context_tokens = min(context_tokens, context_length - max_tokens)
    candidates: list[Prompt] = []
    for path, text in sources:
        ids, offsets = _encode_with_offsets(tokenizer, text)
        starts = {s: i for i, (s, e) in enumerate(offsets) if e > s}
        first = [s for s, _ in offsets]

        def token_at(c: int, first=first, offsets=offsets) -> int | None:  # the token that covers character c
            i = bisect.bisect_right(first, c) - 1
            return i if i >= 0 and offsets[i][0] <= c < offsets[i][1] else None

        lines = text.split("\n")
        pos = 0
        for n, line in enumerate(lines):
            line_start = pos
            pos += len(line) + 1
            if n == 0 or n + 1 >= len(lines) or line != line.rstrip() or len(line.strip()) < 4:
                continue
            j = token_at(line_start + len(line) - len(line.lstrip()))  # the token of the first code character
            end = starts.get(line_start + len(line))  # the token that starts with the line's own '\n'
            if j is None or end is None or j < 8 or offsets[j][0] < line_start or (end - j) + 1 > max_tokens - 1:
                continue
            reference = text[offsets[j][0] : line_start + len(line)]
            candidates.append(Prompt(id=f"{path}:{n + 1}", ids=ids[max(0, j - context_tokens) : j],
                                     reference=reference))
    return Task(name="next-line", prompts=_evenly(candidates, n_prompts), max_tokens=max_tokens, repeats=repeats,
                score=score_next_line, stop=["\n"],
                notes="exact match of the generated rest of the line (the prompt ends after the line break and the "
                      "indentation; generation stops at the next line break)")


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


def chat_eval_rows(n: int | None = None) -> list[dict]:
    """The held-out chat and code prompts written for the SmolLM2 pair (bench/prompts/smollm2_eval.jsonl),
    chat and code alternating: rows with `kind`, `prompt` and `answers` (chat) or `tests` (code)."""
    from adasd_core.distill.prompts import eval_prompts

    rows = eval_prompts()
    chat, code = [r for r in rows if r["kind"] == "chat"], [r for r in rows if r["kind"] == "code"]
    mixed = [r for pair in zip(chat, code) for r in pair] + chat[len(code):] + code[len(chat):]
    return mixed[:n] if n else mixed


def chat_eval_prompts(tokenizer, n: int | None = None) -> list[str]:
    """chat_eval_rows' prompts rendered with the tokenizer's chat template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                          add_generation_prompt=True) for r in chat_eval_rows(n)]
