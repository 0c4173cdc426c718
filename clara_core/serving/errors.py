"""HTTP-specific errors; every one renders as ``{"error": {"code", "message"}}`` with its status."""

from __future__ import annotations

from ..errors import ClaraError


class Unauthorized(ClaraError):
    http_status = 401
    code = "unauthorized"


class PayloadTooLarge(ClaraError):
    http_status = 413
    code = "payload_too_large"


class ServiceUnavailable(ClaraError):
    """503; the response carries ``Retry-After: retry_after`` (seconds)."""

    http_status = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(ServiceUnavailable):
    code = "queue_full"


class QueueTimeout(ServiceUnavailable):
    """A request waited longer than ``--queue-timeout`` for an adapter slot."""

    code = "queue_timeout"


class EngineError(ClaraError):
    """The engine failed while generating (not the client's doing): 500, counted as an engine error."""

    http_status = 500
    code = "engine_error"


class AdapterInUse(ClaraError):
    http_status = 409
    code = "adapter_in_use"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
