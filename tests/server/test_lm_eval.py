"""EleutherAI's lm-evaluation-harness against a live server, as docs/serving.md tells a user to run it:
model type local-completions, the server's own tokenizer (lm-eval's remote tokenizer), a
log-likelihood task and a generation task on a few local JSONL items, once per method through
the model aliases (`tiny:ar`, and `tiny` for the server's default method).

lm-eval lives in its own venv under the user cache (scripts/evals/lm_eval_env.py), created on
the first run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch
from server_support import API_KEY

from scripts.evals.lm_eval_env import ensure

# contexts end without a space: lm-eval joins context and choice with " " (target_delimiter)
MC = [
    {"question": "def add(a, b):\n    return a", "choices": ["+ b", "- b", "* b"], "answer": 0},
    {"question": "import os\nimport", "choices": ["sys", "re", "json"], "answer": 0},
    {"question": "for i in range(10):\n   ", "choices": ["print(i)", "pass", "break"], "answer": 0},
    {"question": "class Config:\n    def __init__(self", "choices": ["):", ", path):", ", *args, **kwargs):"],
     "answer": 1},
]
GEN = [
    {"prompt": "def add(a, b):\n    return", "target": " a + b"},
    {"prompt": "import os\nimport", "target": " sys"},
    {"prompt": "class Config:\n    def", "target": " __init__(self):"},
]
TASKS = {
    "adasd_mc": ["output_type: multiple_choice", 'doc_to_text: "{{question}}"', 'doc_to_choice: "{{choices}}"',
                 'doc_to_target: "{{answer}}"', "metric_list:", "  - metric: acc"],
    "adasd_gen": ["output_type: generate_until", 'doc_to_text: "{{prompt}}"', 'doc_to_target: "{{target}}"',
                  "generation_kwargs:", '  until: ["\\n"]', "  max_gen_toks: 8", "  do_sample: false",
                  "metric_list:", "  - metric: exact_match"],
}


@pytest.fixture(scope="module")
def lm_eval():
    return ensure()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, items in (("adasd_mc", MC), ("adasd_gen", GEN)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        head = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
                f"    test: {d / f'{name}.jsonl'}", "test_split: test"]
        (d / f"{name}.yaml").write_text("\n".join(head + TASKS[name]) + "\n")
    return d


def run_lm_eval(lm_eval, server, task_dir, out_dir, model: str) -> dict[str, list[dict]]:
    """The command of docs/serving.md; returns each task's logged samples."""
    args = [str(lm_eval), "-m", "lm_eval", "run", "--model", "local-completions",
            "--model_args", f"model={model},base_url={server.base_url}/v1/completions,max_length=128,"
                            f"auth_token={API_KEY}",
            "--tasks", "adasd_mc", "adasd_gen", "--include_path", str(task_dir), "--batch_size", "4",
            "--output_path", str(out_dir), "--log_samples"]
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(out_dir / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "remote tokenizer" in done.stderr.lower()  # it tokenized through /tokenize, not a local copy
    (results,) = out_dir.rglob("results_*.json")
    metrics = json.loads(results.read_text())["results"]
    assert set(metrics) == {"adasd_mc", "adasd_gen"}
    assert "acc,none" in metrics["adasd_mc"] and "exact_match,none" in metrics["adasd_gen"]
    samples = {}
    for task in ("adasd_mc", "adasd_gen"):
        (path,) = out_dir.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return samples


@torch.inference_mode()
def in_process_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """What lm-eval computes, with the target in this process: trailing spaces of the context move
    to the continuation, the pair is encoded whole and split after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    rows = logp[n_ctx - 1 : len(whole) - 1]  # row i predicts whole[n_ctx + i]
    cont = torch.tensor(whole[n_ctx:])
    return rows[torch.arange(len(cont)), cont].sum().item(), bool((rows.argmax(-1) == cont).all())


def test_lm_eval_runs_loglikelihood_and_generation_tasks_with_ar_and_the_default_method(
        lm_eval, server, task_dir, pair_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = {m: server.metric("adasd_requests_total", method=m, status="success") for m in ("ar", "adasd")}
    ar = run_lm_eval(lm_eval, server, task_dir, tmp_path / "ar", "tiny:ar")
    after_ar = {m: server.metric("adasd_requests_total", method=m, status="success") for m in ("ar", "adasd")}
    default = run_lm_eval(lm_eval, server, task_dir, tmp_path / "default", "tiny")
    after = {m: server.metric("adasd_requests_total", method=m, status="success") for m in ("ar", "adasd")}
    # the alias chose the method of every request: 3 choices per question plus one generation per item
    n_requests = sum(len(d["choices"]) for d in MC) + len(GEN)
    assert after_ar["ar"] - before["ar"] == n_requests and after_ar["adasd"] == before["adasd"]
    assert after["adasd"] - after_ar["adasd"] == n_requests and after["ar"] == after_ar["ar"]

    model = AutoModelForCausalLM.from_pretrained(pair_dir / "target", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(pair_dir / "target")
    for doc, sample, other in zip(MC, ar["adasd_mc"], default["adasd_mc"]):
        assert sample["doc"] == doc
        got = [(float(r[0][0]), r[0][1] == "True") for r in sample["resps"]]
        want = [in_process_loglikelihood(model, tok, a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        assert len(got) == len(doc["choices"])
        for (lp, greedy), (want_lp, want_greedy) in zip(got, want):
            assert math.isclose(lp, want_lp, abs_tol=1e-3), (doc, lp, want_lp)
            assert greedy == want_greedy
        # scoring is the target's alone, whatever the method
        assert [float(r[0][0]) for r in other["resps"]] == pytest.approx([lp for lp, _ in got], abs=1e-4)
    for run in (ar, default):
        gens = run["adasd_gen"]
        assert [s["doc"] for s in gens] == GEN
        assert all(isinstance(s["resps"][0][0], str) and "\n" not in s["resps"][0][0] for s in gens)
