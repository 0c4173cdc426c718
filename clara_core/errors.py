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


# -- storage faults: each gets its own honest message, never "not a clara registry" ---------------------------


class NotWritable(ClaraError):
    """A folder or file clara must write is read-only (mount, permissions); the message names it."""

    http_status = 503
    code = "not_writable"


class DiskFull(ClaraError):
    """No space left on the disk clara writes to; the message names the folder."""

    http_status = 507
    code = "disk_full"


class RegistryLocked(RegistryError):
    """Another process holds ``registry.db``'s lock longer than clara waits; retrying is the remedy."""

    http_status = 503
    code = "registry_locked"


class RegistryReadOnly(RegistryError, NotWritable):
    http_status = 503
    code = "registry_read_only"


class RegistryDiskFull(RegistryError, DiskFull):
    http_status = 507
    code = "registry_disk_full"


class RegistryCorrupt(RegistryError):
    """``registry.db`` is damaged; the message says how to recover its rows (``sqlite3 ... .recover``)."""

    http_status = 500
    code = "registry_corrupt"


class RegistryEmpty(RegistryError):
    """``registry.db`` is zero bytes in a workspace that holds adapters or bases: it was lost, not new."""

    code = "registry_empty"


class NotFound(ClaraError):
    http_status = 404
    code = "not_found"


class Conflict(ClaraError):
    http_status = 409
    code = "conflict"


class InvalidInput(ClaraError):
    http_status = 422
    code = "invalid_input"


class ExportRejected(ClaraError):
    """An exporter wrote its files but its own verification refused them (the message says by how much)."""


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
