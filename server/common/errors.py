"""Errors the engine raises and the HTTP layer maps to the OpenAI error envelope.

Each carries its HTTP status, an OpenAI-style ``type``/``code`` and the offending ``param`` where one
applies, so the HTTP layer needs no mapping table. Store errors (adapters_store.store) carry
``http_status`` the same way.
"""

from __future__ import annotations


class ServingError(Exception):
    http_status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class BadRequest(ServingError):
    http_status = 400
    type = "invalid_request_error"
    code = "bad_request"


class InvalidParameter(ServingError):
    http_status = 400
    type = "invalid_request_error"
    code = "invalid_parameter"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class UnknownAdapter(ServingError):
    """Unknown, deleted or another tenant's adapter: 404, never a silent fallback to the base."""

    http_status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class TaskMismatch(InvalidParameter):
    code = "adapter_task_mismatch"


class QueueFull(ServingError):
    http_status = 429
    type = "rate_limit_error"
    code = "queue_full"


class AdapterLoadFailed(ServingError):
    """The adapter named by the request could not be made resident (corrupt file, no slot in time)."""

    http_status = 424
    code = "adapter_load_failed"


class Unavailable(ServingError):
    """Draining, not ready, or the engine is dead."""

    http_status = 503
    code = "unavailable"


class RequestTimeout(ServingError):
    """A request body or upload that stopped arriving (the client is too slow or gone silent)."""

    http_status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RequestFailed(ServingError):
    """This request's own work failed inside the engine (a bug or a fault it alone hit); the engine and every
    other request go on."""

    http_status = 500
    code = "request_failed"


class DeadlineExceeded(ServingError):
    http_status = 504
    code = "deadline_exceeded"
