"""Names and ids, in one place: adapter ids, domains, methods, base names, and the "did you mean" hint.

An adapter id reads ``<domain>-<method>-r<rank>-v<N>`` (several domains are joined with '.'), the same as its
folder ``models/adapters/<domain>/<method>-r<rank>-v<N>/``. Every command, the registry, the JSON import and
the server check names with these functions, so a name refused in one place is refused everywhere.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path

from .errors import InvalidInput

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_DOMAIN_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_METHOD_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_BASE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
#: Domains never contain '-', so the parts of an id are unambiguous.
_ADAPTER_ID_PARTS_RE = re.compile(
    r"^(?P<key>[a-z0-9][a-z0-9_.]*)-(?P<method>[a-z0-9][a-z0-9_]*)-r(?P<rank>\d+)-v(?P<version>\d+)$"
)
_FOLDER_RE = re.compile(r"^(?P<method>[a-z0-9][a-z0-9_]*)-r(?P<rank>\d+)-v(?P<version>\d+)$")


def validate_adapter_id(value: str) -> str:
    """An adapter id: ``[a-z0-9._-]`` only, no ``..``, no path separators."""
    if not value or not _ID_RE.match(value) or ".." in value or len(value) > 200:
        raise InvalidInput(
            f"invalid adapter id {value!r}: ids use only a-z, 0-9, '.', '_' and '-' "
            "(like steuerrecht-lora-r16-v1) and never contain '/' or '..'"
        )
    return value


def normalise_domain(value: str) -> str:
    """``Verwaltungs-Verfahren`` -> ``verwaltungs_verfahren``; umlauts spelled out; anything else refused."""
    domain = value.strip().lower()
    for umlaut, plain in (("ä", "ae"), ("ö", "oe"), ("ü", "ue"), ("ß", "ss")):
        domain = domain.replace(umlaut, plain)
    domain = domain.replace("-", "_").replace(" ", "_")
    if not _DOMAIN_RE.match(domain) or len(domain) > 64:
        raise InvalidInput(f"invalid domain {value!r}: use letters, digits and '_' (like steuerrecht)")
    return domain


def normalise_method(value: str) -> str:
    """A trainer method's name as ids and folders spell it (``LoRA`` -> ``lora``)."""
    method = value.strip().lower()
    if not _METHOD_RE.match(method) or len(method) > 64:
        raise InvalidInput(f"invalid method {value!r}: use a-z, 0-9 and '_' (like lora or qlora)")
    return method


def normalise_base_name(value: str) -> str:
    """``Leo Base`` -> ``leo_base``; a name that could be read as a path (``..``, ``/``) is refused."""
    name = value.strip().lower().replace(" ", "_")
    if not _BASE_NAME_RE.match(name) or ".." in name or len(name) > 200:
        raise InvalidInput(f"invalid base name {value!r}: use a-z, 0-9, '.', '_' and '-' (like leo_base)")
    return name


def domain_key(domains: list[str]) -> str:
    """The domain part of an adapter id: one domain, or several joined with '.'."""
    return ".".join(domains)


def make_adapter_id(domains: list[str], method: str, rank: int, version: int) -> str:
    return validate_adapter_id(f"{domain_key(domains)}-{method}-r{rank}-v{version}")


def adapter_folder_name(method: str, rank: int, version: int) -> str:
    return f"{method}-r{rank}-v{version}"


def parse_adapter_id(adapter_id: str) -> tuple[str, str, int, int] | None:
    """``(domain_key, method, rank, version)`` of an id in the convention, or None."""
    match = _ADAPTER_ID_PARTS_RE.match(adapter_id)
    if not match:
        return None
    return match["key"], match["method"], int(match["rank"]), int(match["version"])


def version_from_folder(folder: Path | None, method: str, rank: int) -> int | None:
    """The version in a folder named by the convention (``lora-r16-v3`` -> 3) when method and rank match."""
    if folder is None:
        return None
    match = _FOLDER_RE.match(Path(folder).name)
    if match and match["method"] == method and int(match["rank"]) == rank:
        return int(match["version"])
    return None


def did_you_mean(value: str, known: Iterable[str], *, limit: int = 3) -> str:
    """``"; did you mean a, b?"`` with the closest of ``known`` to ``value``, or ``""`` when none is close."""
    close = difflib.get_close_matches(value, list(known), n=limit, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""
