"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}.

Client mistakes are 4xx with a message that says what to change; a bug is a 500 whose body says
only that (the traceback goes to the log, never to the client). Error bodies are ASCII JSON, so
that a message quoting a client's bad string can never fail to encode.

`LastResortGuard` is the outermost middleware: an exception that escapes everything else becomes
that OpenAI-shaped 500 and the connection stays usable. (Starlette's own handler for `Exception`
answers but then re-raises, and uvicorn closes the connection on any exception that reaches it:
the client's next request on that keep-alive connection was reset.)
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adasd_core.errors import AdasdError, InvalidRequestError
from server.protocol import OWN_ERROR_TYPES

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
    def __init__(
        self, message: str = "the worker process died during this request; it is being restarted, retry shortly"
    ):
        super().__init__(message, code="worker_died")


class InternalError(ServerError):
    def __init__(self, message: str = "internal server error (see the server log)"):
        super().__init__(message, code="internal_error")


class UnsupportedError(InvalidRequestError):
    """A field OpenAI defines that this server cannot honour (at a non-neutral value)."""

    def __init__(self, param: str, message: str | None = None):
        super().__init__(message or f"{param} is not supported by this server: omit it", param=param,
                         code="unsupported_parameter")


class ErrorJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(status: int, message: str, type_: str | None = None, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_status(exc: AdasdError) -> int:
    return getattr(exc, "status_code", 400)


def error_dict(exc: AdasdError) -> dict:
    return error_body(error_status(exc), exc.message, getattr(exc, "error_type", None), exc.param, exc.code)


def error_response(exc: AdasdError) -> JSONResponse:
    return ErrorJSONResponse(error_dict(exc), status_code=error_status(exc), headers=getattr(exc, "headers", None))


PROMPT_TYPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _field_path(err: dict) -> str:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # a dict key that failed is followed by "[key]": the key is the client's data, not a field name
    loc = [x for i, x in enumerate(loc) if loc[i + 1:i + 2] != ["[key]"]]
    # union members show up in the location (e.g. prompt.list[...].0): keep the field path only
    return ".".join(x for x in loc if not any(c in x for c in "[]"))


def _closest_member(errors: list[dict]) -> list[dict]:
    """A union's errors (all of one field): those of the member that failed least (then deepest)."""
    by_member: dict[str, list[dict]] = {}
    for err in errors:
        loc = [x for x in err.get("loc", ()) if x != "body"]
        by_member.setdefault(str(loc[1]) if len(loc) > 1 else "", []).append(err)
    return min(by_member.values(), key=lambda errs: (len(errs), -len(errs[0].get("loc", ()))))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param): up to three complaints; param is the dotted path of the first (e.g. messages.0.role)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # our own checks (invalid Unicode, token ids) say what is wrong; a union's other members only
    # say that the value is not of their type
    errors = [e for e in errors if e.get("type") in OWN_ERROR_TYPES] or errors
    first = errors[0]
    loc0 = next((str(x) for x in first.get("loc", ()) if x != "body"), None)
    if first.get("type") not in OWN_ERROR_TYPES and loc0 == "prompt":
        # each member of the prompt's union complains: report the closest one's first complaint
        err = _closest_member([e for e in errors if _field_path(e).split(".")[0] == "prompt"])[0]
        name = _field_path(err)
        if err.get("type") == "missing":
            return f"prompt: this field is required ({PROMPT_TYPES})", "prompt"
        if name == "prompt":
            return f"prompt: must be {PROMPT_TYPES}", "prompt"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        return f"{name}: {msg} (the prompt must be {PROMPT_TYPES})", name
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})".replace(" ()", ""), None
    parts, param = [], None
    for err in errors[:3]:
        name = _field_path(err)
        param = param or name or None
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "this field is required" if name else "the request body is empty: send a JSON object"
        elif err.get("type") == "model_attributes_type" and not name:
            msg = "the request body must be a JSON object (sent with Content-Type: application/json)"
        elif err.get("type") == "finite_number":
            msg = "must be a finite number (not NaN or Infinity)"
        parts.append(f"{name}: {msg}" if name else msg)
    return "; ".join(dict.fromkeys(parts)), param


def _body_parse_message(exc: BaseException | None) -> str:
    """Why FastAPI could not parse a body (it says only "There was an error parsing the body")."""
    if isinstance(exc, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte {exc.start})"
    if isinstance(exc, RecursionError):
        return "the request body is nested too deeply"
    if isinstance(exc, ValueError) and "digits" in str(exc):  # int() of more than sys.get_int_max_str_digits()
        return "the request body holds a number with too many digits"
    return "the request body is not valid JSON"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ErrorJSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(AdasdError)
    async def _adasd(request: Request, exc: AdasdError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 400 and message == "There was an error parsing the body":
            message = _body_parse_message(exc.__cause__)
        return ErrorJSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                                 headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError())


class LastResortGuard:
    """ASGI middleware, outermost: an exception that escapes the app is logged and answered with the
    OpenAI-shaped 500 on a connection that stays open. If the response had already started (a
    stream), it cannot be answered: returning lets uvicorn close that one connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await error_response(InternalError())(scope, receive, send)
