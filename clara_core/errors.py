"""Errors a user can act on.

Every ``ClaraError`` is rendered by the CLI as one line (what went wrong, where, what to do) and a non-zero exit
code, and by the HTTP server as a JSON error body. Anything else escaping to the top is a bug.
"""

from __future__ import annotations


class ClaraError(Exception):
    """A problem the user can fix; the message says what, where and what to do."""

    exit_code = 1
    #: HTTP status the server answers with when this error reaches a request.
    http_status = 400
    #: Short machine-readable code for JSON error bodies.
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class WorkspaceNotFound(ClaraError):
    code = "no_workspace"


class RegistryError(ClaraError):
    code = "registry_error"


class NotFound(ClaraError):
    http_status = 404
    code = "not_found"


class Conflict(ClaraError):
    http_status = 409
    code = "conflict"


class InvalidInput(ClaraError):
    http_status = 422
    code = "invalid_input"


class PluginError(ClaraError):
    code = "plugin_error"


class UnknownPluginName(PluginError):
    http_status = 404
    code = "unknown_plugin"


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its class name when it has none.

    Library errors often carry multi-line messages (tracebacks of a worker, hints); a user-facing one-line error
    quotes only this.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
