"""Typed errors for user mistakes. The server maps them to OpenAI-shaped 4xx responses."""

from __future__ import annotations


class AdasdError(Exception):
    """Base class for errors caused by a request or configuration, not by a bug."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(AdasdError):
    pass


class ContextLengthError(InvalidRequestError):
    def __init__(self, message: str, param: str | None = "prompt"):
        super().__init__(message, param=param, code="context_length_exceeded")


class IncompatiblePairError(AdasdError):
    """Target and draft cannot be paired (different vocabularies)."""


class ModelLoadError(Exception):
    """A model named on the command line or in the settings cannot be loaded: not found, an incomplete
    folder, or too large for the device. The message says what was looked for, where, and what to do;
    front ends print it alone (a traceback only at debug level)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """No such local folder, cached snapshot or hub model."""
