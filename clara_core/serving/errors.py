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
    http_status = 503
    code = "unavailable"


class QueueFull(ServiceUnavailable):
    code = "queue_full"


class AdaptersBusy(ServiceUnavailable):
    code = "adapters_busy"


class EngineError(ClaraError):
    """The engine failed while generating (not the client's doing): 500, counted as an engine error."""

    http_status = 500
    code = "engine_error"


class AdapterInUse(ClaraError):
    http_status = 409
    code = "adapter_in_use"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
