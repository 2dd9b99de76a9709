"""A tiny OpenAI-compatible streaming server for bench-serve tests, on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "fake-model"


def fake_speculative(method: str | None, tokens: int, tokens_per_chunk: int) -> dict:
    """usage.speculative as adasd's server sends it (the fields bench-serve reads): one round per chunk;
    `ar` drafts nothing, every other method drafts 3 candidates a round and accepts tokens_per_chunk - 1."""
    rounds = -(-tokens // tokens_per_chunk)
    drafted = 0 if method == "ar" else 3 * rounds
    accepted = 0 if method == "ar" else (tokens_per_chunk - 1) * rounds
    return {"method": method or "adasd", "generated_tokens": tokens, "rounds": rounds, "drafted_tokens": drafted,
            "accepted_standard": accepted, "accepted_relaxed": 0,
            "mean_draft_length": drafted / rounds if rounds else 0.0}


def make_app(tokens_per_chunk: int = 2, delay_s: float = 0.002, loading_polls: int | None = None,
             speculative: bool = False) -> FastAPI:
    """loading_polls: None serves no /ready (404); n answers 503 to the first n polls of /ready.
    speculative: the final usage carries `speculative` statistics, as adasd's server sends."""
    app = FastAPI()
    app.state.bodies = []
    app.state.polls = 0

    if loading_polls is not None:
        @app.get("/ready")
        async def ready():
            app.state.polls += 1
            if app.state.polls <= loading_polls:
                return JSONResponse({"status": "starting"}, status_code=503)
            return {"status": "ready"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        if body.get("fail") == "http":
            return JSONResponse({"error": {"message": "refused", "type": "invalid_request_error"}}, status_code=400)
        n = int(body["max_tokens"])

        async def events():
            sent = 0
            while sent < n:
                k = min(tokens_per_chunk, n - sent)
                sent += k
                chunk = {"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                         "choices": [{"index": 0, "text": " tok" * k,
                                      "finish_reason": "length" if sent == n else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                if body.get("fail") == "stream":
                    yield f"data: {json.dumps({'error': {'message': 'worker died', 'code': 500}})}\n\n"
                    break
                await asyncio.sleep(delay_s)
            if body.get("stream_options", {}).get("include_usage") and body.get("fail") != "stream":
                usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
                if speculative:
                    usage["speculative"] = fake_speculative((body.get("adasd") or {}).get("method"), n,
                                                            tokens_per_chunk)
                yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """Runs the app in a background thread; `with FakeServer() as url: ...`."""

    def __init__(self, **app_kwargs):
        self.app = make_app(**app_kwargs)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fake server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
