"""What evaluation harnesses ask of a server: prompt log-probabilities (echo with logprobs), the
tokenizer endpoints in vLLM's shapes, and per-method model aliases."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from server_support import API_KEY

SCORE = {"model": "tiny", "echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0}
PROMPTS = ["def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value",
           "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n" * 2]


@pytest.fixture(scope="module")
def target(pair_dir):
    """The quick pair's target and tokenizer, in this process (transformers' own forward)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pair_dir / "target", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(pair_dir / "target")


@torch.inference_mode()
def reference(target, ids: list[int], top_n: int):
    """Per prompt token after the first: its logprob under the target, and the top-N logprobs."""
    model, _ = target
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    chosen = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    return chosen, logp.topk(top_n, dim=-1).values.tolist()


def check_prompt_scores(target, ids: list[int], lp: dict, top_n: int = 2) -> None:
    _, tok = target
    n = len(ids)
    assert lp["tokens"][:n] == [tok.decode([i]) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # as OpenAI's legacy API and vLLM
    chosen, top = reference(target, ids, top_n)
    for got, want in zip(lp["token_logprobs"][1:n], chosen):
        assert math.isclose(got, want, abs_tol=1e-4), (got, want)
    for got, want in zip(lp["top_logprobs"][1:n], top):
        # keyed by token text: two top tokens that decode alike share a key
        assert all(any(math.isclose(v, w, abs_tol=1e-4) for w in want) for v in got.values()), (got, want)
        assert math.isclose(max(got.values()), want[0], abs_tol=1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def post(server, path: str, body: dict) -> dict:
    with server.http() as http:
        r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def encode(target, text: str) -> list[int]:
    return target[1](text, add_special_tokens=True)["input_ids"]


def test_echo_with_logprobs_scores_a_prompt_with_the_targets_log_probabilities(server, target):
    out = post(server, "/v1/completions", {**SCORE, "prompt": PROMPTS[0]})
    ids = encode(target, PROMPTS[0])
    (choice,) = out["choices"]
    check_prompt_scores(target, ids, choice["logprobs"])
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    assert choice["text"] == target[1].decode(ids, skip_special_tokens=True) and choice["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 0


def test_echo_alone_with_max_tokens_0_returns_the_prompt(server, target):
    out = post(server, "/v1/completions", {"prompt": PROMPTS[0], "echo": True, "max_tokens": 0})
    (choice,) = out["choices"]
    ids = encode(target, PROMPTS[0])
    assert choice["text"] == target[1].decode(ids, skip_special_tokens=True) and choice["logprobs"] is None
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 0


def test_lists_of_prompts_and_n_are_scored_each(server, target):
    # (prompts longer than a prefill chunk: tests/core/test_prompt_logprobs.py)
    ids = [encode(target, p) for p in PROMPTS]
    for prompt in (PROMPTS, ids):  # strings, and token ids as lm-eval sends them
        out = post(server, "/v1/completions", {**SCORE, "prompt": prompt, "n": 2})
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        for c in out["choices"]:
            check_prompt_scores(target, ids[c["index"] // 2], c["logprobs"])


def test_echo_with_logprobs_and_generation_scores_the_prompt_then_the_tokens(server, target):
    ids = encode(target, PROMPTS[0])
    gen = {"prompt": PROMPTS[0], "logprobs": 2, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
           "adasd": {"method": "ar"}}
    plain = post(server, "/v1/completions", gen)["choices"][0]
    both = post(server, "/v1/completions", {**gen, "echo": True})["choices"][0]
    lp = both["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 5
    check_prompt_scores(target, ids, lp)
    assert lp["tokens"][len(ids):] == plain["logprobs"]["tokens"]
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(lp["token_logprobs"][len(ids):],
                                                                  plain["logprobs"]["token_logprobs"]))
    echo = target[1].decode(ids, skip_special_tokens=True)
    assert both["text"] == echo + plain["text"]
    assert lp["text_offset"][len(ids)] == len(echo)  # generated tokens are placed after the echoed prompt


def test_streamed_scores_equal_the_response(server, target):
    body = {**SCORE, "prompt": PROMPTS, "max_tokens": 3, "ignore_eos": True, "adasd": {"method": "ar"}}
    whole = post(server, "/v1/completions", body)
    texts, lps = {}, {}
    with server.http() as http, http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            (c,) = json.loads(line[6:])["choices"]
            if c["index"] not in texts:  # the first chunk: the echoed prompt with its scores
                assert c["logprobs"]["token_logprobs"][0] is None
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            for key, values in (c["logprobs"] or {}).items():
                lps.setdefault(c["index"], {}).setdefault(key, []).extend(values)
    for c in whole["choices"]:
        assert texts[c["index"]] == c["text"]
        assert lps[c["index"]]["tokens"] == c["logprobs"]["tokens"]
        assert lps[c["index"]]["text_offset"] == c["logprobs"]["text_offset"]


def test_model_aliases_pick_the_method(server):
    with server.http() as http:
        cards = http.get("/v1/models").json()["data"]
        methods = ["ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid"]
        assert [c["id"] for c in cards] == ["tiny"] + [f"tiny:{m}" for m in methods]
        assert all(c["parent"] == "tiny" for c in cards[1:]) and cards[0]["parent"] is None
        assert http.get("/v1/models/tiny:vanilla").json()["id"] == "tiny:vanilla"
        for name, method in (("tiny:ar", "ar"), ("tiny:vanilla", "vanilla"), ("tiny", "adasd")):
            r = http.post("/v1/completions", json={"model": name, "prompt": "x = ", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["speculative"]["method"] == method, r.text
        r = http.post("/v1/chat/completions", json={"model": "tiny:ar", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["usage"]["speculative"]["method"] == "ar"
        # an alias and the same method in the adasd field agree
        r = http.post("/v1/completions", json={"model": "tiny:ar", "prompt": "x", "max_tokens": 1,
                                               "adasd": {"method": "ar"}})
        assert r.status_code == 200


def test_tokenizer_endpoints_speak_vllms_shapes(server, target):
    _, tok = target
    text = PROMPTS[0]
    out = post(server, "/tokenize", {"prompt": text})
    assert out == {"count": len(out["tokens"]), "max_model_len": 128, "tokens": encode(target, text),
                   "token_strs": None}
    bare = post(server, "/tokenize", {"model": "tiny", "prompt": text, "add_special_tokens": False,
                                      "return_token_strs": True})
    assert bare["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    assert bare["token_strs"] == tok.convert_ids_to_tokens(bare["tokens"])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat = post(server, "/tokenize", {"messages": messages})
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert post(server, "/detokenize", {"tokens": bare["tokens"]}) == {"prompt": text}

    with server.http() as http:
        info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == 128
    # lm-eval's remote tokenizer finds the EOS id by tokenizing the EOS string
    assert post(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})["tokens"] == \
        [tok.eos_token_id]


def test_tokenizer_endpoints_need_the_api_key(server):
    for method, path, body in (("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/tokenizer_info", None)):
        r = httpx.request(method, server.base_url + path, json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
        ok = httpx.request(method, server.base_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200, path
