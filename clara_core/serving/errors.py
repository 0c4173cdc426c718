"""HTTP-specific errors; every one renders as ``{"error": {"code", "message"}}`` with its status."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from ..errors import ClaraError


class Unauthorized(ClaraError):
    http_status = 401
    code = "unauthorized"


class PayloadTooLarge(ClaraError):
    http_status = 413
    code = "payload_too_large"


class RequestTimeout(ClaraError):
    """The client did not send its request body within ``--read-timeout``."""

    http_status = 408
    code = "request_timeout"


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


class AdapterChanged(ServiceUnavailable):
    """A loaded adapter's registry row changed (removed, or its id now names other files) while requests
    still run on the old weights: new requests wait for those to finish rather than get the old weights."""

    code = "adapter_changed"


class EngineError(ClaraError):
    """The engine failed while generating (not the client's doing): 500, counted as an engine error."""

    http_status = 500
    code = "engine_error"


class AdapterInUse(ClaraError):
    http_status = 409
    code = "adapter_in_use"


def error_body(code: str, message: str) -> dict:
    # a message that quotes a client's text must still encode: lone surrogates become \udXXX escapes
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"code": code, "message": message}}


#: An absolute POSIX path: a slash, then a name, more names after slashes (stops at spaces, quotes, brackets).
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.<>/~-])/[^\s'"`()\[\]{},;:<>]+""")


def redact_paths(message: str, known: Iterable[tuple[str, str]] = ()) -> str:
    """``message`` without the server's file-system paths, for a client.

    ``known`` pairs a path with what the client may see instead (``<adapter ID>``, ``<workspace>``); the
    longest paths are replaced first. Any other absolute path whose first folder exists on this machine
    (``/home/...``, ``/tmp/...``, ``/etc``) becomes ``<server path>``; routes such as ``/v1/completions``
    stay as they are. The full message belongs in the server's log, not in a response.
    """
    for path, label in sorted(known, key=lambda pair: len(pair[0]), reverse=True):
        if path and path != "/":
            message = message.replace(path, label)

    def hide(match: re.Match[str]) -> str:
        text = match.group(0)
        first = text.split("/", 2)[1]
        return "<server path>" if first and os.path.exists("/" + first) else text

    return _ABSOLUTE_PATH.sub(hide, message)
