"""Loaders and scorers: GSM8K, HumanEval (run in a subprocess), MMLU, and the demo tasks."""

import pytest
from bench_fixtures import GSM8K, HUMANEVAL, write_jsonl

from adasd_core.bench import evals
from adasd_core.bench.tasks import (
    Prompt,
    continuation_task,
    next_line_task,
    score_next_line,
)

# ----------------------------------------------------------------------------- GSM8K


def test_gsm8k_reference_and_extraction():
    assert evals.gsm8k_reference(GSM8K[1]["answer"]) == "1000"
    assert evals.gsm8k_reference(GSM8K[2]["answer"]) == "2.5"
    assert evals.gsm8k_extract(" 3 + 4 = 7 apples.\n#### 7\n\nQuestion: next") == "7"
    assert evals.gsm8k_extract(" so the answer is $1,000.") == "1000"
    assert evals.gsm8k_extract(" first 12, then 30 left") == "30"
    assert evals.gsm8k_extract(" no idea") is None
    with pytest.raises(ValueError, match="####"):
        evals.gsm8k_reference("no marker")


def test_gsm8k_prompts_and_score(tmp_path):
    rows = evals.read_jsonl(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K))
    items, shots = evals.gsm8k_prompts(rows, n_shot=1)
    assert len(items) == 2 and shots.startswith("Question: Tom has 3 apples")
    pid, text, ref = items[0]
    assert text.startswith(shots) and text.endswith("What is the price?\nAnswer:") and ref == "1000"
    p = Prompt(id=pid, ids=[], reference=ref)
    assert evals.score_gsm8k(p, " 1200 - 200 = 1000\n#### 1000") == 1.0
    assert evals.score_gsm8k(p, " 1200 + 200 = 1400\n#### 1400") == 0.0


# ----------------------------------------------------------------------------- MMLU


def test_mmlu_both_formats(tmp_path):
    rows = [
        {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "elementary_mathematics"},
        {"question": "Capital of France?", "A": "Paris", "B": "Rome", "C": "Oslo", "D": "Bern", "answer": "A"},
    ]
    items = evals.mmlu_prompts(evals.read_jsonl(write_jsonl(tmp_path / "mmlu.jsonl", rows)))
    (id0, text0, ref0), (_, text1, ref1) = items
    assert ref0 == "B" and ref1 == "A"
    assert "about elementary mathematics" in text0 and "B. 4\n" in text0 and text0.endswith("Answer:")
    p = Prompt(id=id0, ids=[], reference="B")
    assert evals.score_mmlu(p, " B") == 1.0
    assert evals.score_mmlu(p, " (B) 4") == 1.0
    assert evals.score_mmlu(p, " A") == 0.0
    assert evals.score_mmlu(p, " Because") == 0.0  # a word starting with B is not an answer


def test_mmlu_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(ValueError, match="4 choices"):
        evals.mmlu_prompts(evals.read_jsonl(path))


# ----------------------------------------------------------------------------- HumanEval

def test_humaneval_pass_fail_timeout(tmp_path):
    (pid, text, meta), = evals.humaneval_prompts(evals.read_jsonl(write_jsonl(tmp_path / "he.jsonl", [HUMANEVAL])))
    p = Prompt(id=pid, ids=[], meta=meta)
    score = evals.make_humaneval_scorer(timeout_s=3.0)
    assert score(p, "    return a + b\n") == 1.0
    assert score(p, "    return a - b\n") == 0.0
    assert score(p, "    while True:\n        pass\n") == 0.0  # killed at the timeout
    # the completion is cut at the first stop string (here a new top-level def)
    assert score(p, "    return a + b\ndef add(a, b):\n    return 0\n") == 1.0
    # a chat answer (no stop strings) that rewrites the whole function in a fenced block
    chat_score = evals.make_humaneval_scorer(timeout_s=3.0, stop=[])
    assert chat_score(p, "Sure:\n```python\ndef add(a, b):\n    return b + a\n```\n") == 1.0


def test_run_program_statuses():
    assert evals.run_program("print('ok')").status == "passed"
    failed = evals.run_program("raise SystemExit(3)")
    assert failed.status == "failed"
    r = evals.run_program("import time\ntime.sleep(30)", timeout_s=1.0)
    assert r.status == "timeout" and not r.passed


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evals.read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        evals.read_jsonl(bad)


# ----------------------------------------------------------------------------- demo tasks

SOURCE = '''import os


def area(width, height):
    """Area of a rectangle."""
    result = width * height
    return result


class Box:
    def __init__(self, size):
        self.size = size
        self.items = []

    def add(self, item):
        self.items.append(item)
        return len(self.items)
'''


@pytest.fixture(scope="module")
def tokenizer(quick_pair_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(quick_pair_dir / "target")


def test_next_line_prompts_end_where_the_code_starts(tokenizer):
    task = next_line_task(tokenizer, [("box.py", SOURCE)], n_prompts=50, context_tokens=64, max_tokens=24,
                          context_length=128)
    assert task.prompts and task.score is score_next_line and task.stop == ["\n"]
    lines = SOURCE.split("\n")
    full = tokenizer(SOURCE, add_special_tokens=False)["input_ids"]
    for p in task.prompts:
        line = lines[int(p.id.rsplit(":", 1)[1]) - 1]
        # the prompt + the reference is the source up to the end of the line, and the reference is
        # the line's code (at most the last indentation space joins the first word)
        head = tokenizer.decode(p.ids)
        assert (head + p.reference + "\n") in SOURCE and line.endswith(p.reference)
        assert p.reference.strip() == line.strip() and len(p.reference) - len(p.reference.lstrip()) <= 1
        assert head.endswith("\n" + line[: len(line) - len(p.reference)])
        # a token boundary of the whole file
        k = next(i for i in range(len(full)) if full[i : i + len(p.ids)] == p.ids)
        assert tokenizer.decode(full[: k + len(p.ids)]).endswith(head)
    ref = task.prompts[0]
    assert score_next_line(ref, ref.reference + "\n") == 1.0
    assert score_next_line(ref, ref.reference + "\n    x = 1") == 1.0
    assert score_next_line(ref, ref.reference) == 0.0  # the line is not finished
    assert score_next_line(ref, ref.reference + "x\n") == 0.0
    assert score_next_line(ref, "\n" + ref.reference + "\n") == 0.0


def test_continuation_windows(tokenizer):
    task = continuation_task(tokenizer, [("box.py", SOURCE)], n_prompts=3, prompt_tokens=16, max_tokens=8,
                             context_length=128, stride=8)
    assert len(task.prompts) == 3 and all(len(p.ids) == 16 for p in task.prompts)
    assert task.score is None and task.max_tokens == 8


def test_held_out_chat_and_code_rows_are_scored_by_answer_and_by_tests():
    from adasd_core.bench.evals import score_chat_eval
    from adasd_core.bench.tasks import chat_eval_rows

    rows = chat_eval_rows()
    assert {r["kind"] for r in rows} == {"chat", "code"} and len(rows) == 64
    capital = next(r for r in rows if r["prompt"] == "What is the capital of France?")
    assert score_chat_eval(capital, "The capital of France is Paris.") == 1.0
    assert score_chat_eval(capital, "The capital of France is Lyon.") == 0.0
    palindrome = next(r for r in rows if r.get("entry_point") == "is_palindrome")
    good = "Here it is:\n```python\ndef is_palindrome(s):\n    return s == s[::-1]\n```\nIt reverses s."
    assert score_chat_eval(palindrome, good) == 1.0
    assert score_chat_eval(palindrome, good.replace("s[::-1]", "s[::2]")) == 0.0
    assert score_chat_eval(palindrome, "I cannot write code.") == 0.0
    open_ended = next(r for r in rows if "answers" not in r and "tests" not in r)
    assert score_chat_eval(open_ended, "Anything.") is None
