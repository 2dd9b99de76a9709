"""The official openai client against a real server: completions and chat, streamed and not."""

from __future__ import annotations

import pytest

PROMPT = "def add(a, b):\n"
IGNORE_EOS = {"ignore_eos": True}  # extensions travel in extra_body


def stream_text(stream) -> tuple[list[str], list, object]:
    """Completion or chat stream -> (text per choice, finish reasons, usage of the last chunk)."""
    texts: dict[int, list[str]] = {}
    finishes: dict[int, list[str]] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts.setdefault(c.index, []).append(piece)
            if c.finish_reason is not None:
                finishes.setdefault(c.index, []).append(c.finish_reason)
    n = max(texts) + 1
    return ["".join(texts[i]) for i in range(n)], [finishes.get(i, []) for i in range(n)], usage


def check_usage(usage, completion_tokens: int | None = None) -> dict:
    spec = usage.speculative
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens == spec["generated_tokens"]
    for key in ("acceptance_rate", "mean_draft_length", "accepted_relaxed", "accepted_standard", "estimated_speedup",
                "drafted_tokens", "target_forwards", "draft_forwards"):
        assert key in spec, key
    assert spec["accepted_standard"] + spec["accepted_relaxed"] <= spec["drafted_tokens"]
    if spec["drafted_tokens"]:
        assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["drafted_tokens"], abs=1e-3)
    if completion_tokens is not None:
        assert usage.completion_tokens == completion_tokens
    return spec


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and all(i.startswith("tiny:") for i in ids[1:])  # then the per-method aliases
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_usage_and_speculative_stats(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, extra_body=IGNORE_EOS)
    assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    spec = check_usage(r.usage, completion_tokens=8)
    assert spec["prompt_tokens"] == r.usage.prompt_tokens and spec["method"] == "adasd"


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=11)], ids=["greedy", "seeded"])
def test_streamed_text_equals_non_streamed(client, sampling):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, **sampling)
    full = client.completions.create(**kw)
    texts, finishes, usage = stream_text(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert texts == [full.choices[0].text]
    assert finishes == [[full.choices[0].finish_reason]]  # exactly once
    check_usage(usage, completion_tokens=full.usage.completion_tokens)


def test_chat_streamed_equals_non_streamed(client):
    kw = dict(model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
              max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    check_usage(full.usage)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, finishes, usage = stream_text(iter(chunks))
    assert texts == [full.choices[0].message.content]
    assert finishes == [[full.choices[0].finish_reason]]
    check_usage(usage, completion_tokens=full.usage.completion_tokens)


def test_chat_seeded_stream_equals_non_streamed_with_n(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "print"}]}],
              max_tokens=8, temperature=1.0, seed=3, n=2)
    full = client.chat.completions.create(**kw)
    texts, finishes, _ = stream_text(client.chat.completions.create(stream=True, **kw))
    assert texts == [c.message.content for c in full.choices]
    assert finishes == [[c.finish_reason] for c in full.choices]


def test_n_choices(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0)
    r = client.completions.create(seed=5, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    # choice i is sampled with seed + i: distinct and reproducible
    alone = [client.completions.create(seed=5 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in r.choices] == alone
    spec = check_usage(r.usage)
    assert spec["choices"] == 3
    texts, finishes, usage = stream_text(client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5, n=3, stream=True,
        stream_options={"include_usage": True}))
    assert texts == [c.text for c in r.choices] and all(len(f) == 1 for f in finishes)
    assert usage.completion_tokens == r.usage.completion_tokens


def test_seed_reproducibility(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.0)
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1  # the quick pair samples from ~5 nats per token: 10 tokens never coincide


def test_stop_string(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, extra_body=IGNORE_EOS)
    text = client.completions.create(**kw).choices[0].text
    # the first two characters past the start that are not blank and occur there first: no seed to pick
    at = next(i for i in range(2, len(text) - 1) if text[i : i + 2].strip() and text.find(text[i : i + 2]) == i)
    stop = text[at : at + 2]
    r = client.completions.create(stop=[stop, "@@never@@"], **kw)
    assert r.choices[0].text == text[:at]
    assert r.choices[0].finish_reason == "stop"
    texts, finishes, _ = stream_text(client.completions.create(stop=stop, stream=True, **kw))
    assert texts == [r.choices[0].text] and finishes == [["stop"]]


def test_prompt_forms(client, pair_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair_dir / "target")
    prompts = [PROMPT, "class A:\n"]
    ids = [tok(p)["input_ids"] for p in prompts]
    kw = dict(model="tiny", max_tokens=6, temperature=1.0, seed=9)
    singles = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    assert client.completions.create(prompt=ids[0], **kw).choices[0].text == singles[0]
    batch = client.completions.create(prompt=prompts, n=2, **kw)
    assert [c.text for c in batch.choices][::2] == singles
    assert batch.usage.prompt_tokens == sum(map(len, ids))
    by_ids = client.completions.create(prompt=ids, **kw)
    assert [c.text for c in by_ids.choices] == singles


def test_echo_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith(PROMPT)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                  extra_body=IGNORE_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 5
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=3, extra_body=IGNORE_EOS)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)


def test_tiny_top_p_and_temperature_are_greedy(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8)
    body = {"adasd": {"method": "vanilla"}, **IGNORE_EOS}
    greedy = client.completions.create(temperature=0, extra_body=body, **kw).choices[0].text
    for top_p in (5e-324, 1e-9):  # the first is 0 in float32
        assert client.completions.create(temperature=1.0, top_p=top_p, extra_body=body, **kw).choices[0].text == greedy
    for temperature in (1e-320, 1e-7):  # sampled greedily
        assert client.completions.create(temperature=temperature, extra_body=body, **kw).choices[0].text == greedy


@pytest.mark.parametrize("method", ["ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid"])
def test_methods(client, method):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    adasd = {"method": method, "k": 3, "verification": "threshold"}
    r = client.completions.create(extra_body={"adasd": adasd, **IGNORE_EOS}, **kw)
    spec = check_usage(r.usage, completion_tokens=8)
    assert spec["method"] == method
    if method == "ar":
        assert spec["drafted_tokens"] == 0 and spec["draft_forwards"] == 0
    if method in ("vanilla", "gen-only"):  # lossless: greedy output is the target's
        ar = client.completions.create(extra_body={"adasd": {"method": "ar"}, **IGNORE_EOS}, **kw)
        assert r.choices[0].text == ar.choices[0].text
