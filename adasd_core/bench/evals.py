"""GSM8K, HumanEval and MMLU from local JSONL files (the paper's benchmarks), for real models.

Formats (one JSON object per line):
- GSM8K (openai/grade-school-math): {"question": ..., "answer": "... #### 72"}
- HumanEval (openai/human-eval): {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
- MMLU (cais/mmlu rows): {"question", "choices": [4 strings], "answer": 0-3 or "A"-"D", "subject"?};
  also {"question", "A", "B", "C", "D", "answer": "A"-"D"}.

Prompts are plain completion prompts (base-model style, as lm-evaluation-harness writes them);
`chat=True` wraps each one in the tokenizer's chat template instead.

HumanEval runs model-written code: each program runs in its own `python -I` subprocess, in a
temporary directory, with a timeout and a memory limit. That is not a sandbox; run untrusted
models in a container.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adasd_core.bench.tasks import Prompt, Task, cut_at_stop

LETTERS = "ABCD"


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass the path of a local JSONL file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n} is not valid JSON: {exc.msg}") from None
    if not rows:
        raise ValueError(f"{path} has no records")
    return rows


def _require(row: dict, keys: tuple[str, ...], path, n: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{path} record {n} lacks {', '.join(missing)}: see adasd_core/bench/evals.py for the format")


# ----------------------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5'; None when there is no number."""
    m = _NUMBER.search(text)
    if not m:
        return None
    s = m.group(0).replace("$", "").replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_reference(answer: str) -> str:
    """The number after '####' in a GSM8K answer."""
    if "####" not in answer:
        raise ValueError(f"a GSM8K answer must end with '#### <number>': {answer[-60:]!r}")
    ref = normalize_number(answer.split("####")[-1])
    if ref is None:
        raise ValueError(f"no number after '####' in {answer[-60:]!r}")
    return ref


def gsm8k_extract(completion: str) -> str | None:
    """The model's final answer: after '####', else after 'answer is', else the last number."""
    if "####" in completion:
        return normalize_number(completion.split("####", 1)[1])
    m = re.search(r"answer is[:\s]*(.*)", completion, flags=re.IGNORECASE)
    if m and normalize_number(m.group(1)) is not None:
        return normalize_number(m.group(1))
    numbers = _NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else None


GSM8K_STOP = ["\n\nQuestion:", "Question:", "\n\n\n"]


def score_gsm8k(prompt: Prompt, completion: str) -> float:
    return float(gsm8k_extract(cut_at_stop(completion, GSM8K_STOP)) == prompt.reference)


def gsm8k_prompts(rows: list[dict], n_shot: int = 4, path="gsm8k") -> tuple[list[tuple[str, str, str]], str]:
    """(id, prompt text, reference) per question; the first n_shot records are the examples (and
    are not evaluated)."""
    for n, row in enumerate(rows, 1):
        _require(row, ("question", "answer"), path, n)
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows[:n_shot])
    out = []
    for i, row in enumerate(rows[n_shot:], n_shot):
        out.append((f"gsm8k/{i}", f"{shots}Question: {row['question']}\nAnswer:", gsm8k_reference(row["answer"])))
    return out, shots


# ----------------------------------------------------------------------------- MMLU


def _mmlu_fields(row: dict, path, n: int) -> tuple[str, list[str], str, str]:
    if "choices" in row:
        _require(row, ("question", "choices", "answer"), path, n)
        choices = list(row["choices"])
    else:
        _require(row, ("question", "A", "B", "C", "D", "answer"), path, n)
        choices = [row[c] for c in LETTERS]
    if len(choices) != 4:
        raise ValueError(f"{path} record {n}: MMLU needs 4 choices, got {len(choices)}")
    answer = row["answer"]
    letter = LETTERS[answer] if isinstance(answer, int) else str(answer).strip().upper()[:1]
    if letter not in LETTERS:
        raise ValueError(f"{path} record {n}: answer must be 0-3 or A-D, got {answer!r}")
    return row["question"], choices, letter, row.get("subject", "")


def mmlu_question(question: str, choices: list[str]) -> str:
    return question.strip() + "\n" + "".join(f"{letter}. {c}\n" for letter, c in zip(LETTERS, choices)) + "Answer:"


def mmlu_prompts(rows: list[dict], n_shot: int = 0, path="mmlu") -> list[tuple[str, str, str]]:
    """(id, prompt text, reference letter); the first n_shot records are the examples."""
    parsed = [_mmlu_fields(r, path, n) for n, r in enumerate(rows, 1)]
    shots = "".join(f"{mmlu_question(q, c)} {a}\n\n" for q, c, a, _ in parsed[:n_shot])
    out = []
    for i, (q, c, a, subject) in enumerate(parsed[n_shot:], n_shot):
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n" \
            if subject else "The following are multiple choice questions (with answers).\n\n"
        out.append((f"mmlu/{i}", head + shots + mmlu_question(q, c), a))
    return out


def mmlu_extract(completion: str) -> str | None:
    """The first standalone A-D in the completion ('B', ' (B)', 'B. foo', 'The answer is B')."""
    m = re.search(r"\b([ABCD])\b", completion)
    return m.group(1) if m else None


def score_mmlu(prompt: Prompt, completion: str) -> float:
    return float(mmlu_extract(completion) == prompt.reference)


# ----------------------------------------------------------------------------- HumanEval

HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""


_RUNNER = (
    "import resource, runpy, sys\n"
    "limit = int(sys.argv[2]) * 2**20\n"
    "try:\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "except (ValueError, OSError):\n"
    "    pass\n"
    "sys.argv = sys.argv[1:2]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def run_program(program: str, timeout_s: float = 10.0, memory_mib: int = 2048) -> ExecResult:
    """Run a Python program in a fresh isolated interpreter (memory-limited, in a temporary
    directory, its own process group); passed iff it exits 0 within timeout_s."""
    with tempfile.TemporaryDirectory(prefix="adasd-humaneval-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _RUNNER, str(script), str(memory_mib)], cwd=tmp, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)  # the whole group: the program may have started children
            except ProcessLookupError:
                pass
            proc.communicate()
            return ExecResult(False, "timeout", f"no exit within {timeout_s:g} s")
    if proc.returncode == 0:
        return ExecResult(True, "passed")
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return ExecResult(False, "failed", lines[-1] if lines else f"exit status {proc.returncode}")


def extract_code(completion: str) -> str:
    """A fenced code block's body when there is one (chat models), else the completion."""
    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, flags=re.DOTALL)
    return m.group(1) if m else completion


def humaneval_program(prompt_text: str, completion: str, test: str, entry_point: str) -> str:
    code = extract_code(completion)
    # a chat model may rewrite the whole function; otherwise the completion continues the prompt
    body = code if re.search(rf"^def {re.escape(entry_point)}\b", code, flags=re.MULTILINE) else prompt_text + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def make_humaneval_scorer(timeout_s: float = 10.0, stop: list[str] = HUMANEVAL_STOP):
    def score(prompt: Prompt, completion: str) -> float:
        completion = cut_at_stop(completion, stop)
        program = humaneval_program(prompt.meta["prompt"], completion, prompt.meta["test"], prompt.meta["entry_point"])
        return float(run_program(program, timeout_s).passed)
    return score


def humaneval_prompts(rows: list[dict], path="humaneval") -> list[tuple[str, str, dict]]:
    out = []
    for n, row in enumerate(rows, 1):
        _require(row, ("task_id", "prompt", "test", "entry_point"), path, n)
        out.append((row["task_id"], row["prompt"], {"prompt": row["prompt"], "test": row["test"],
                                                     "entry_point": row["entry_point"]}))
    return out


def score_chat_eval(row: dict, completion: str, timeout_s: float = 10.0) -> float | None:
    """A held-out chat/code row of bench/prompts/smollm2_eval.jsonl: a chat answer is right when one of
    its `answers` appears in the completion (case-insensitive); a code answer when the function
    (`entry_point`, fenced or not) passes every one of its `tests`. None for open-ended rows."""
    if "answers" not in row and "tests" not in row:
        return None
    if "answers" in row:
        text = completion.lower()
        return float(any(a.lower() in text for a in row["answers"]))
    asserts = "\n".join(f"assert {t}" for t in row["tests"])
    return float(run_program(f"{extract_code(completion)}\n\n{asserts}\n", timeout_s).passed)


# ----------------------------------------------------------------------------- tasks


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True needs a tokenizer with a chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _fit(items, tokenizer, chat, max_tokens, context_length, n_prompts):
    prompts, skipped = [], 0
    for pid, text, ref, meta in items:
        if n_prompts is not None and len(prompts) >= n_prompts:
            break
        ids = _encode(tokenizer, text, chat)
        if len(ids) + max_tokens > context_length:
            skipped += 1
            continue
        prompts.append(Prompt(id=pid, ids=ids, reference=ref, meta=meta))
    return prompts, skipped


def gsm8k_task(path, tokenizer, context_length: int, n_prompts: int | None = None, max_tokens: int = 256,
               n_shot: int = 4, chat: bool = False, repeats: int = 1) -> Task:
    rows = read_jsonl(path)
    items, _ = gsm8k_prompts(rows, n_shot=min(n_shot, len(rows) - 1), path=path)
    candidates = [(i, t, r, {}) for i, t, r in items]
    prompts, skipped = _fit(candidates, tokenizer, chat, max_tokens, context_length, n_prompts)
    return Task(name="gsm8k", prompts=prompts, max_tokens=max_tokens, repeats=repeats, score=score_gsm8k,
                stop=GSM8K_STOP, skipped=skipped,
                notes=f"{n_shot}-shot; exact match of the final number")


def mmlu_task(path, tokenizer, context_length: int, n_prompts: int | None = None, max_tokens: int = 4,
              n_shot: int = 0, chat: bool = False, repeats: int = 1) -> Task:
    rows = read_jsonl(path)
    items = mmlu_prompts(rows, n_shot=min(n_shot, len(rows) - 1), path=path)
    candidates = [(i, t, r, {}) for i, t, r in items]
    prompts, skipped = _fit(candidates, tokenizer, chat, max_tokens, context_length, n_prompts)
    return Task(name="mmlu", prompts=prompts, max_tokens=max_tokens, repeats=repeats, score=score_mmlu, skipped=skipped,
                notes=f"{n_shot}-shot; the first A-D letter generated")


def humaneval_task(path, tokenizer, context_length: int, n_prompts: int | None = None, max_tokens: int = 256,
                   chat: bool = False, timeout_s: float = 10.0, repeats: int = 1) -> Task:
    rows = read_jsonl(path)
    items = humaneval_prompts(rows, path=path)
    prompts, skipped = _fit([(i, t, None, m) for i, t, m in items], tokenizer, chat, max_tokens, context_length,
                            n_prompts)
    return Task(name="humaneval", prompts=prompts, max_tokens=max_tokens, repeats=repeats,
                score=make_humaneval_scorer(timeout_s, [] if chat else HUMANEVAL_STOP),
                stop=[] if chat else HUMANEVAL_STOP, skipped=skipped,
                notes=f"pass@1; tests run in a subprocess with a {timeout_s:g} s timeout")
