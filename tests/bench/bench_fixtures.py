"""Small benchmark files the bench tests write (GSM8K, HumanEval), in their usual JSONL formats."""

import json


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A shirt costs $1,200 and is discounted by $200. What is the price?",
     "answer": "1200 - 200 = <<1200-200=1000>>1000\n#### 1,000"},
    {"question": "Half of 5 is?", "answer": "5 / 2 = 2.5\n#### 2.5"},
]


HUMANEVAL = {
    "task_id": "Fixture/0",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
