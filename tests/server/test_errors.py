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
    "presence-penalty": ("/v1/completions", comp(presence_penalty=2.5), 400, "presence_penalty"),
    "frequency-penalty": ("/v1/completions", comp(frequency_penalty=-2.5), 400, "frequency_penalty"),
    "logit-bias": ("/v1/completions", comp(logit_bias={"one": 5}), 400, "logit_bias"),
    "logit-bias-value": ("/v1/completions", comp(logit_bias={"1": 500}), 400, "logit_bias"),
    "best-of": ("/v1/completions", comp(best_of=3), 400, "best_of"),
    "suffix": ("/v1/completions", comp(suffix="x"), 400, "suffix"),
    "echo-logprobs-6": ("/v1/completions", comp(echo=True, logprobs=6, max_tokens=0), 400, "logprobs"),
    "max-tokens-zero-without-echo": ("/v1/completions", comp(max_tokens=0, logprobs=1), 400, "echo"),
    "unknown-method-alias": ("/v1/completions", comp(model="tiny:turbo"), 404, "tiny:turbo"),
    "alias-against-adasd-method": ("/v1/completions", comp(model="tiny:ar", adasd={"method": "vanilla"}), 400,
                                   "adasd.method"),
    "tokenize-prompt-and-messages": ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
                                     400, "prompt"),
    "tokenize-nothing": ("/tokenize", {}, 400, "prompt"),
    "tokenize-unknown-model": ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "gpt-4"),
    "tokenize-chat-both-prompts": ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                                                 "continue_final_message": True}, 400, "continue_final_message"),
    "detokenize-out-of-vocab": ("/detokenize", {"tokens": [1, 99999]}, 400, "99999"),
    "detokenize-not-ids": ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
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
    "chat-tools-auto": ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
                        400, "tool_choice"),
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


def test_neutral_values_of_optional_fields_are_accepted(server):
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
    wrong_key = httpx.post(url + "/v1/completions", json=GOOD, headers={"Authorization": "Bearer wrong"})
    check_error(wrong_key, 401, "api key")
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
        client.completions.create(model="tiny", prompt="x", max_tokens=1, presence_penalty=3.0)
    assert "presence_penalty" in e.value.message and json.dumps(e.value.body)


# ---------------------------------------------------------------------------- below the schema (issue 11)
# Bodies the JSON parser accepts but that are not valid input: lone UTF-16 surrogates (valid JSON,
# invalid Unicode: the tokenizer raised, a 500, and the next request on the connection was reset),
# unknown chat roles (were a 200), token ids that are not non-negative JSON integers, non-finite and
# overlong numbers, and bodies that do not parse at all. Each is a 400 naming the field (param is
# its dotted path) on a connection that then serves a normal request.

BAD = "__BAD__"
LONE = '"abc \\udc80 def"'  # JSON text: a lone low surrogate


def raw(body: dict, literal: str | bytes) -> bytes:
    """`body` as JSON with the string BAD replaced by the raw JSON text `literal`."""
    literal = literal.encode() if isinstance(literal, str) else literal
    return json.dumps(body).encode().replace(json.dumps(BAD).encode(), literal)


def chat(messages: list | None = None, **changes) -> dict:
    return {**CHAT, "messages": messages or CHAT["messages"], **changes}


def user(content) -> list:
    return [{"role": "user", "content": content}]


# id: (path, raw body, expected param, text the message must mention)
BELOW_SCHEMA = {
    "prompt-lone-low-surrogate": ("/v1/completions", raw(comp(prompt=BAD), LONE), "prompt", "unicode"),
    "prompt-lone-high-surrogate": ("/v1/completions", raw(comp(prompt=BAD), '"abc\\ud800"'), "prompt", "\\ud800"),
    "prompt-reversed-pair": ("/v1/completions", raw(comp(prompt=BAD), '"\\ude00\\ud83d"'), "prompt", "surrogate"),
    "prompt-raw-surrogate-bytes": ("/v1/completions", raw(comp(prompt=BAD), b'"a\xed\xb2\x80b"'), "prompt", "unicode"),
    "prompt-list-lone-surrogate": ("/v1/completions", raw(comp(prompt=["ok", BAD]), LONE), "prompt.1", "unicode"),
    "chat-content-surrogate": ("/v1/chat/completions", raw(chat(user(BAD)), LONE), "messages.0.content", "unicode"),
    "chat-part-surrogate": ("/v1/chat/completions", raw(chat(user([{"type": "text", "text": BAD}])), LONE),
                            "messages.0.content.0.text", "unicode"),
    "chat-name-surrogate": ("/v1/chat/completions",
                            raw(chat([{"role": "user", "content": "hi", "name": BAD}]), LONE),
                            "messages.0.name", "unicode"),
    "chat-role-wizard": ("/v1/chat/completions", raw(chat([{"role": "wizard", "content": "hi"}]), ""),
                         "messages.0.role", "'user'"),
    "chat-role-empty": ("/v1/chat/completions", raw(chat([{"role": "", "content": "hi"}]), ""),
                        "messages.0.role", "'system'"),
    "chat-role-number": ("/v1/chat/completions", raw(chat([{"role": 5, "content": "hi"}]), ""),
                         "messages.0.role", "'user'"),
    "chat-role-surrogate": ("/v1/chat/completions", raw(chat([{"role": BAD, "content": "hi"}]), LONE),
                            "messages.0.role", "role"),
    "chat-second-message-role": ("/v1/chat/completions",
                                 raw(chat([{"role": "user", "content": "a"}, {"role": "User", "content": "b"}]), ""),
                                 "messages.1.role", "'user'"),
    "stop-surrogate": ("/v1/completions", raw(comp(stop=BAD), LONE), "stop", "unicode"),
    "stop-list-surrogate": ("/v1/completions", raw(comp(stop=["a", BAD]), LONE), "stop.1", "unicode"),
    "chat-stop-surrogate": ("/v1/chat/completions", raw(chat(stop=[BAD]), LONE), "stop.0", "unicode"),
    "model-surrogate": ("/v1/completions", raw(comp(model=BAD), LONE), "model", "unicode"),
    "chat-model-surrogate": ("/v1/chat/completions", raw(chat(model=BAD), LONE), "model", "unicode"),
    "user-surrogate": ("/v1/completions", raw(comp(user=BAD), LONE), "user", "unicode"),
    "chat-user-surrogate": ("/v1/chat/completions", raw(chat(user=BAD), LONE), "user", "unicode"),
    "suffix-surrogate": ("/v1/completions", raw(comp(suffix=BAD), LONE), "suffix", "unicode"),
    "adasd-method-surrogate": ("/v1/completions", raw(comp(adasd={"method": BAD}), LONE), "adasd.method", "unicode"),
    "logit-bias-key-surrogate": ("/v1/completions", raw(comp(logit_bias={BAD: 1}), LONE), "logit_bias", "unicode"),
    "token-id-negative": ("/v1/completions", raw(comp(prompt=[1, -3]), ""), "prompt.1", "-3"),
    "token-id-huge": ("/v1/completions", raw(comp(prompt=[1, 2**70]), ""), "prompt.1", "vocabulary"),
    "token-id-int64-overflow": ("/v1/completions", raw(comp(prompt=[2**63]), ""), "prompt.0", "vocabulary"),
    "token-id-4000-digits": ("/v1/completions", raw(comp(prompt=[BAD]), "9" * 4000), "prompt.0", "4000-digit"),
    "token-id-float": ("/v1/completions", raw(comp(prompt=[1, 2.5]), ""), "prompt.1", "integer"),
    "token-id-integral-float": ("/v1/completions", raw(comp(prompt=[1, 2.0]), ""), "prompt.1", "integer"),
    "token-id-bool": ("/v1/completions", raw(comp(prompt=[True, 2]), ""), "prompt.0", "integer"),
    "token-id-string": ("/v1/completions", raw(comp(prompt=["1", 2]), ""), "prompt.0", "integer"),
    "token-id-nested-negative": ("/v1/completions", raw(comp(prompt=[[1, 2], [-1]]), ""), "prompt.1.0", "-1"),
    "token-id-nested-float": ("/v1/completions", raw(comp(prompt=[[1.5]]), ""), "prompt.0.0", "integer"),
    "max-tokens-1e400": ("/v1/completions", raw(comp(max_tokens=BAD), "1e400"), "max_tokens", "finite"),
    "max-tokens-4300-digits": ("/v1/chat/completions", raw(chat(max_tokens=BAD), "9" * 4300),
                               "max_tokens", "less than"),
    "max-completion-tokens-huge": ("/v1/chat/completions", raw(chat(max_completion_tokens=2**64), ""),
                                   "max_completion_tokens", "less than"),
    "temperature-nan": ("/v1/completions", raw(comp(temperature=BAD), "NaN"), "temperature", "finite"),
    "temperature-minus-infinity": ("/v1/completions", raw(comp(temperature=BAD), "-Infinity"), "temperature", "finite"),
    "top-p-infinity": ("/v1/chat/completions", raw(chat(top_p=BAD), "Infinity"), "top_p", "finite"),
    "seed-1e400": ("/v1/completions", raw(comp(seed=BAD), "1e400"), "seed", "finite"),
    "top-k-huge": ("/v1/completions", raw(comp(top_k=10**30), ""), "top_k", "less than"),
    "n-huge": ("/v1/completions", raw(comp(n=10**30), ""), "n", "less than"),
    "too-many-prompts": ("/v1/completions", raw(comp(prompt=["a"] * 5000), ""), "prompt", "generations"),
    "body-invalid-utf8": ("/v1/completions", raw(comp(prompt=BAD), b'"a\xff\xfeb"'), None, "UTF-8"),
    "body-overlong-utf8": ("/v1/completions", raw(comp(prompt=BAD), b'"a\xc0\xafb"'), None, "UTF-8"),
    "body-deep-nesting": ("/v1/completions", raw(comp(prompt=BAD), b"[" * 100_000 + b"]" * 100_000), None, "nested"),
    "body-5000-digit-number": ("/v1/completions", raw(comp(max_tokens=BAD), "9" * 5000), None, "digits"),
    "body-raw-nul": ("/v1/completions", raw(comp(prompt=BAD), b'"a\x00b"'), None, "JSON"),
    "body-empty": ("/v1/completions", b"", None, "empty"),
}


@pytest.mark.parametrize("case", list(BELOW_SCHEMA), ids=list(BELOW_SCHEMA))
def test_bad_input_below_the_schema(server, case):
    path, body, param, mention = BELOW_SCHEMA[case]
    with server.http() as http:
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        err = check_error(r, 400, mention)
        assert err["param"] == param, err
        assert err["type"] == "invalid_request_error"
        conn = r.extensions["network_stream"].get_extra_info("client_addr")
        good = http.post("/v1/completions", json=GOOD)
        assert good.status_code == 200, good.text
        assert good.extensions["network_stream"].get_extra_info("client_addr") == conn  # the same connection


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", raw(comp(prompt=BAD), '"a\\u0000b"')),  # NUL is valid Unicode: the tokenizer takes it
    ("/v1/chat/completions", raw(chat(user(BAD)), '"a\\u0000b"')),
    ("/v1/completions", raw(comp(prompt=BAD), '"smile \\ud83d\\ude00"')),  # a surrogate pair is one character
    ("/v1/completions", raw(comp(stop=[BAD]), '"\\ud83d\\ude00"')),
    ("/v1/chat/completions", raw(chat([{"role": r, "content": "x"} for r in
                                       ("system", "developer", "user", "assistant", "tool", "function", "user")]), "")),
], ids=["nul-prompt", "nul-chat", "surrogate-pair", "surrogate-pair-stop", "every-role"])
def test_valid_unicode_and_roles_are_accepted(server, path, body):
    with server.http() as http:
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text


def test_an_unexpected_exception_is_an_openai_500_and_does_not_escape():
    """The last-resort guard: nothing reaches uvicorn, which would close the connection (the next
    request on it was reset). Before the response starts: the OpenAI 500; after: nothing more."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from server.errors import LastResortGuard, install_error_handlers

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(LastResortGuard)

    @app.post("/boom")
    async def boom():
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")

    @app.get("/stream")
    async def stream():
        async def chunks():
            yield "data: 1\n\n"
            raise RuntimeError("mid-stream")
        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def call(method: str, path: str) -> list[dict]:
        """One request straight into the ASGI app, as uvicorn makes it: an escaping exception fails the test."""
        sent, first = [], True

        async def receive():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client stays

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
        await app(scope, receive, send)
        return sent

    async def main():
        sent = await call("POST", "/boom")
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
        body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "internal_error"
        assert "TextEncodeInput" not in json.dumps(body)
        sent = await call("GET", "/stream")  # started: nothing more can be said, but nothing escapes either
        assert sent[0]["status"] == 200 and sent[1]["body"] == b"data: 1\n\n"

    asyncio.run(main())
