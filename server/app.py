"""FastAPI app factory, routes (thin: they hand the request to a serving object) and `run(settings)`."""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
from contextlib import asynccontextmanager

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server.engine_client import EngineClient
from server.errors import (
    AuthenticationError,
    LastResortGuard,
    PayloadTooLargeError,
    error_response,
    install_error_handlers,
)
from server.metrics import AdasdMetrics
from server.playground import router as playground_router
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from server.serving import Tokenizer
from server.serving_chat import OpenAIServingChat
from server.serving_completions import OpenAIServingCompletion
from server.serving_tokenization import OpenAIServingTokenization
from server.settings import Settings

log = logging.getLogger("adasd.server")

TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")  # behind the API key like /v1/*
DRAIN_CAP_FACTOR = 16  # an oversized body is read (and dropped) up to this many times the limit before the 413

router = APIRouter()


# ---------------------------------------------------------------------------- routes


@router.get("/health")
async def health(raw_request: Request) -> JSONResponse:
    """Liveness: 200 while a healthy worker serves; 503 with the reason while none does (loading,
    restarting after a crash or a device error, failed, shutting down)."""
    client = raw_request.app.state.client
    if client.ready:
        return JSONResponse({"status": "ok"})
    body = {"status": client.state}
    if client.last_error:
        body["error"] = client.last_error
    return JSONResponse(body, status_code=503)


@router.get("/ready")
async def ready(raw_request: Request) -> JSONResponse:
    state = raw_request.app.state
    client, tokenizer = state.client, state.tokenizer
    ok = client.ready and tokenizer.loaded
    status = "ready" if ok else ("loading" if client.ready else client.state)
    body = {"status": status, "model": state.settings.served_model_name, "worker_pid": client.worker_pid}
    if client.info:
        body["context_length"] = client.info["context_length"]
        body["device"] = client.info["device"]
        body["slots"] = client.info.get("slots")  # requests batched at once
        body["kv_blocks"], body["block_size"] = client.info.get("kv_blocks"), client.info.get("block_size")
    if not ok and client.last_error:
        body["error"] = client.last_error
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    # answered by MetricsEndpoint before the app is reached; the route puts it in the OpenAPI schema
    content, content_type = raw_request.app.state.metrics.render()
    return Response(content, headers={"Content-Type": content_type})


def _model_card(raw_request: Request, method: str | None = None) -> ModelCard:
    """The served model, or its alias for one method (`<name>:<method>`, parent: the served name)."""
    state = raw_request.app.state
    info = state.client.info or {}
    name = state.settings.served_model_name
    return ModelCard(id=f"{name}:{method}" if method else name, root=state.settings.target,
                     parent=name if method else None, max_model_len=info.get("context_length"))


@router.get("/v1/models")
async def list_models(raw_request: Request) -> dict:
    methods = raw_request.app.state.serving_completion.alias_methods
    return ModelList(data=[_model_card(raw_request)] + [_model_card(raw_request, m) for m in methods]).model_dump()


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, raw_request: Request) -> dict:
    method = raw_request.app.state.serving_completion.check_model(model)
    return _model_card(raw_request, method).model_dump()


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.serving_completion.create_completion(request, raw_request)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.serving_chat.create_chat_completion(request, raw_request)


# vLLM's tokenizer endpoints, at the root as vLLM has them (lm-eval's remote tokenizer looks there)
@router.post("/tokenize")
async def tokenize(request: TokenizeRequest, raw_request: Request) -> dict:
    return (await raw_request.app.state.serving_tokenization.tokenize(request)).model_dump()


@router.post("/detokenize")
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> dict:
    return (await raw_request.app.state.serving_tokenization.detokenize(request)).model_dump()


@router.get("/tokenizer_info")
async def tokenizer_info(raw_request: Request) -> dict:
    return raw_request.app.state.serving_tokenization.tokenizer_info()


# ---------------------------------------------------------------------------- middleware


class MetricsEndpoint:
    """ASGI middleware, outermost: GET /metrics answered from memory without the framework's routing
    and response machinery, which cost several times the exposition itself. An endpoint picker
    scrapes every pod every 50 ms; this keeps each scrape to a fraction of a millisecond of the loop."""

    def __init__(self, app, metrics: AdasdMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        body, content_type = self.metrics.render()
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})


class RequestGuard:
    """ASGI middleware: Bearer API key on /v1/* and the tokenizer endpoints (health, ready, metrics
    stay open) and a bound on the request body (413). The body is read here and replayed to the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and (path.startswith("/v1/") or path in TOKENIZER_PATHS) and not self._authorized(scope):
            return await error_response(AuthenticationError())(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)

        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.limit:
                if size > self.limit * DRAIN_CAP_FACTOR:
                    break
                continue
            body.append(chunk)
        if size > self.limit:
            return await error_response(PayloadTooLargeError(self.limit))(scope, receive, send)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False


# ---------------------------------------------------------------------------- app


def build_app(settings: Settings) -> FastAPI:
    metrics = AdasdMetrics(settings.served_model_name, settings.method, vllm_names=settings.vllm_metric_names)
    tokenizer = Tokenizer(settings)

    def on_fatal(message: str) -> None:
        log.error("stopping the server: %s", message)
        app.state.fatal = message
        server = getattr(app.state, "uvicorn_server", None)
        if server is not None:
            server.should_exit = True

    client = EngineClient(settings, metrics, on_fatal=on_fatal)

    async def load_tokenizer() -> None:
        try:
            await tokenizer.load()
        except Exception as exc:
            from adasd_core.errors import ModelLoadError

            if isinstance(exc, ModelLoadError):  # its message says it all; the traceback at debug level
                log.debug("could not load the tokenizer", exc_info=True)
                on_fatal(exc.message)
                return
            log.exception("could not load the tokenizer")
            on_fatal(f"could not load the tokenizer of {settings.target!r}: {exc}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load_tokenizer())
        await client.start()
        yield
        task.cancel()
        await client.shutdown()
        tokenizer.close()

    app = FastAPI(title="adasd", summary="OpenAI-compatible server with adaptive speculative decoding",
                  lifespan=lifespan, strict_content_type=False)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.client = client
    app.state.tokenizer = tokenizer
    app.state.fatal = None
    app.state.serving_completion = OpenAIServingCompletion(settings, client, tokenizer)
    app.state.serving_chat = OpenAIServingChat(settings, client, tokenizer)
    app.state.serving_tokenization = OpenAIServingTokenization(settings, client, tokenizer)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(LastResortGuard)
    app.add_middleware(MetricsEndpoint, metrics=metrics)  # added last: the outermost of ours
    app.include_router(router)
    app.include_router(playground_router)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, telling the engine client to drain when SIGTERM / SIGINT arrives."""

    def __init__(self, config: uvicorn.Config, on_signal):
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig, frame) -> None:
        self.on_signal()
        super().handle_exit(sig, frame)


def run(settings: Settings) -> None:
    """Serve until SIGTERM / SIGINT: in-flight requests get `shutdown_timeout` seconds to finish."""
    level = logging.getLevelName(settings.log_level.upper())  # uvicorn registers TRACE
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=level, log_config=None,
                            timeout_graceful_shutdown=settings.shutdown_timeout, lifespan="on")
    # in-flight requests are ended by the engine client just before uvicorn would cancel them
    grace_s = max(0.0, settings.shutdown_timeout - 0.5)
    server = _Server(config, on_signal=lambda: app.state.client.begin_drain(grace_s))
    app.state.uvicorn_server = server
    log.info("adasd serving %r (target=%s, draft=%s, method=%s) on http://%s:%s", settings.served_model_name,
             settings.target, settings.draft, settings.method, settings.host, settings.port)
    server.run()
    if app.state.fatal:
        sys.exit(1)
