"""Client mistakes: each a 4xx in the OpenAI error shape; the server stays healthy and serves the next request."""

from __future__ import annotations

import json

import httpx
import pytest
from server_support import API_KEY

GOOD = {"model": "tiny", "prompt": "x = 1\n", "max_tokens": 1}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def comp(**changes) -> dict:
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()

# id: (path, body (dict, or raw bytes), expected status, text the message or param must mention)
CASES = {
    "invalid-json": ("/v1/completions", b'{"prompt": "x", ', 400, "JSON"),
    "body-not-object": ("/v1/completions", b"[1, 2]", 400, "object"),
    "prompt-wrong-type": ("/v1/completions", comp(prompt=123), 400, "prompt"),
    "max-tokens-wrong-type": ("/v1/completions", comp(max_tokens="many"), 400, "max_tokens"),
    "temperature-wrong-type": ("/v1/completions", comp(temperature="hot"), 400, "temperature"),
    "stream-wrong-type": ("/v1/completions", comp(stream={"a": 1}), 400, "stream"),
    "missing-prompt": ("/v1/completions", comp(prompt=DROP), 400, "prompt"),
    "empty-prompt": ("/v1/completions", comp(prompt=""), 400, "empty"),
    "empty-prompt-list": ("/v1/completions", comp(prompt=[]), 400, "empty"),
    "empty-token-list": ("/v1/completions", comp(prompt=[[]]), 400, "empty"),
    "temperature-negative": ("/v1/completions", comp(temperature=-1), 400, "temperature"),
    "temperature-huge": ("/v1/completions", comp(temperature=1000), 400, "temperature"),
    "top-p-zero": ("/v1/completions", comp(top_p=0), 400, "top_p"),
    "max-tokens-zero": ("/v1/completions", comp(max_tokens=0), 400, "max_tokens"),
    "prompt-too-long": ("/v1/completions", comp(prompt="x = 1\n" * 200), 400, "context"),
    "prompt-plus-max-tokens-too-long": ("/v1/completions", comp(max_tokens=125), 400, "max_tokens"),
    "unknown-model": ("/v1/completions", comp(model="gpt-4"), 404, "gpt-4"),
    "logprobs-6": ("/v1/completions", comp(logprobs=6), 400, "logprobs"),
    "n-0": ("/v1/completions", comp(n=0), 400, "n"),
    "n-beyond-capacity": ("/v1/completions", comp(n=128), 400, "n"),
    "presence-penalty": ("/v1/completions", comp(presence_penalty=0.5), 400, "presence_penalty"),
    "frequency-penalty": ("/v1/completions", comp(frequency_penalty=-0.5), 400, "frequency_penalty"),
    "logit-bias": ("/v1/completions", comp(logit_bias={"1": 5}), 400, "logit_bias"),
    "best-of": ("/v1/completions", comp(best_of=3), 400, "best_of"),
    "suffix": ("/v1/completions", comp(suffix="x"), 400, "suffix"),
    "echo-with-logprobs": ("/v1/completions", comp(echo=True, logprobs=1), 400, "echo"),
    "empty-stop": ("/v1/completions", comp(stop=[""]), 400, "stop"),
    "unknown-method": ("/v1/completions", comp(adasd={"method": "turbo"}), 400, "adasd.method"),
    "unknown-verification": ("/v1/completions", comp(adasd={"verification": "vibes"}), 400, "adasd.verification"),
    "k-out-of-range": ("/v1/completions", comp(adasd={"method": "vanilla", "k": 0}), 400, "adasd.k"),
    "token-id-out-of-vocab": ("/v1/completions", comp(prompt=[1, 2, 99999]), 400, "99999"),
    "token-id-negative": ("/v1/completions", comp(prompt=[1, -3]), 400, "-3"),
    "seed-too-big": ("/v1/completions", comp(seed=2**70), 400, "seed"),
    "oversized-body": ("/v1/completions", comp(prompt="x" * (2 << 20)), 413, "bytes"),
    "chat-no-messages": ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    "chat-bad-message": ("/v1/chat/completions", {**CHAT, "messages": ["hi"]}, 400, "messages"),
    "chat-image-part": ("/v1/chat/completions",
                        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                        400, "image_url"),
    "chat-tools": ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    "chat-top-logprobs-without-logprobs": ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "logprobs"),
    "chat-too-long": ("/v1/chat/completions", {**CHAT, "max_tokens": 127}, 400, "max_tokens"),
    "chat-unknown-model": ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "nope"),
    "unknown-route": ("/v1/embeddings", GOOD, 404, "/v1/embeddings"),
}


def check_error(r: httpx.Response, status: int, mention: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert mention.lower() in (err["message"] + " " + str(err["param"])).lower(), err
    assert "Traceback" not in r.text and 'File "' not in r.text
    return err


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input(server, case):
    path, body, status, mention = CASES[case]
    with server.http() as http:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = http.post(path, json=body)
        err = check_error(r, status, mention)
        if case.startswith("prompt-") and "too-long" in case:
            assert err["code"] == "context_length_exceeded"
        assert http.get("/health").status_code == 200
        good = http.post("/v1/completions", json=GOOD)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 1


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    with server.http() as http:
        r = http.post("/v1/completions", json=comp(presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                                   best_of=1, user="u", some_future_field={"x": 1}))
        assert r.status_code == 200, r.text


def test_wrong_http_method(server):
    with server.http() as http:
        check_error(http.get("/v1/completions"), 405, "method")


def test_api_key(server):
    url = server.base_url
    no_key = httpx.post(url + "/v1/completions", json=GOOD)
    err = check_error(no_key, 401, "api key")
    assert no_key.headers["www-authenticate"] == "Bearer" and err["type"] == "authentication_error"
    check_error(httpx.post(url + "/v1/completions", json=GOOD, headers={"Authorization": "Bearer wrong"}), 401, "api key")
    check_error(httpx.get(url + "/v1/models", headers={"Authorization": f"Basic {API_KEY}"}), 401, "api key")
    ok = httpx.post(url + "/v1/completions", json=GOOD, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    for path in ("/health", "/ready", "/metrics"):  # probes and scrapes stay open
        assert httpx.get(url + path).status_code == 200, path


def test_error_shape_from_openai_client(client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=1, presence_penalty=1.0)
    assert "presence_penalty" in e.value.message and json.dumps(e.value.body)
