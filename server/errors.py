"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}.

Client mistakes are 4xx with a message that says what to change; a bug is a 500 whose body says
only that (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adasd_core.errors import AdasdError, InvalidRequestError

log = logging.getLogger("adasd.server")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
}


class ServerError(AdasdError):
    """An AdasdError with its own status and, optionally, response headers."""

    status_code = 500
    error_type = "internal_error"
    headers: dict[str, str] | None = None


class AuthenticationError(ServerError):
    status_code, error_type = 401, "authentication_error"
    headers = {"WWW-Authenticate": "Bearer"}

    def __init__(self, message: str = "missing or invalid API key: send `Authorization: Bearer <key>`"):
        super().__init__(message, code="invalid_api_key")


class ModelNotFoundError(ServerError):
    status_code, error_type = 404, "not_found_error"

    def __init__(self, model: str, served: str):
        super().__init__(f"the model {model!r} does not exist on this server; it serves {served!r}",
                         param="model", code="model_not_found")


class PayloadTooLargeError(ServerError):
    status_code, error_type = 413, "invalid_request_error"

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit} bytes", code="request_too_large")


class QueueFullError(ServerError):
    status_code, error_type = 429, "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="queue_full")
        self.headers = {"Retry-After": str(retry_after)}


class ServiceUnavailableError(ServerError):
    status_code, error_type = 503, "service_unavailable_error"

    def __init__(self, message: str, code: str = "not_ready", retry_after: int = 5):
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(retry_after)}


class EngineDeadError(ServiceUnavailableError):
    def __init__(self, message: str = "the worker process died during this request; it is being restarted, retry shortly"):
        super().__init__(message, code="worker_died")


class InternalError(ServerError):
    def __init__(self, message: str = "internal server error (see the server log)"):
        super().__init__(message, code="internal_error")


class UnsupportedError(InvalidRequestError):
    """A field OpenAI defines that this server cannot honour (at a non-neutral value)."""

    def __init__(self, param: str, message: str | None = None):
        super().__init__(message or f"{param} is not supported by this server: omit it", param=param,
                         code="unsupported_parameter")


def error_body(status: int, message: str, type_: str | None = None, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_status(exc: AdasdError) -> int:
    return getattr(exc, "status_code", 400)


def error_dict(exc: AdasdError) -> dict:
    return error_body(error_status(exc), exc.message, getattr(exc, "error_type", None), exc.param, exc.code)


def error_response(exc: AdasdError) -> JSONResponse:
    return JSONResponse(error_dict(exc), status_code=error_status(exc), headers=getattr(exc, "headers", None))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc0 = next((str(x) for x in first.get("loc", ()) if x != "body"), None)
    if loc0 == "prompt" and len(first.get("loc", ())) <= 3:  # the union's members each complain: say it once
        return "prompt: must be a string, a list of strings, a list of token ids or a list of token-id lists", "prompt"
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})".replace(" ()", ""), None
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # union members show up in the location (e.g. prompt.list[int].0): keep the field path only
        loc = [x for x in loc if not any(c in x for c in "[]")]
        name = ".".join(loc)
        param = param or (loc[0] if loc else None)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "this field is required"
        elif err.get("type") == "model_attributes_type" and not name:
            msg = "the request body must be a JSON object (sent with Content-Type: application/json)"
        parts.append(f"{name}: {msg}" if name else msg)
    return "; ".join(dict.fromkeys(parts)), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(AdasdError)
    async def _adasd(request: Request, exc: AdasdError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError())
