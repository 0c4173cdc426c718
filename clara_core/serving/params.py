"""Types of request-body fields, shared by the native and the OpenAI-compatible bodies.

Each bound is one a client can be told about in a 422, rather than a value that passes validation and then
fails inside the engine (where it could take a whole batch of other clients' requests with it):

- ``Text``: a JSON string may carry a lone UTF-16 surrogate (``"\\ud800"``), which is no character at all and
  which no tokenizer, database or log can encode;
- ``Temperature``: 0 (greedy) or 0.01 to 5; far below 0.01, logits divided by it overflow to infinity;
- ``TopP``: 0.001 to 1; smaller values keep one token anyway (use temperature 0 for that);
- ``Seed``: a signed 64-bit integer, what every engine's random generator takes.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, StrictInt, StrictStr

MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 5.0
MIN_TOP_P = 0.001
SEED_RANGE = (-(2**63), 2**63 - 1)


def _characters_only(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone surrogate ({value[exc.start]!r} at position {exc.start}), which is no character; "
            "send valid Unicode text"
        ) from None
    return value


def _temperature(value: float) -> float:
    if value != 0.0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(
            f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, got {value!r}"
        )
    return value


def _top_p(value: float) -> float:
    if not MIN_TOP_P <= value <= 1.0:
        raise ValueError(
            f"top_p must be between {MIN_TOP_P:g} and 1, got {value!r} (for the most likely token only, "
            "use temperature 0)"
        )
    return value


def _seed(value: int) -> int:
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ValueError(f"seed must be a 64-bit integer ({low} to {high}), got {value}")
    return value


Text = Annotated[StrictStr, AfterValidator(_characters_only)]
Temperature = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_temperature)]
TopP = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_top_p)]
Seed = Annotated[StrictInt, AfterValidator(_seed)]


def check_text(value: str, what: str) -> str:
    """``value`` unless it holds a lone surrogate (text from elsewhere than a validated body field)."""
    from ..errors import InvalidInput

    try:
        return _characters_only(value)
    except ValueError as exc:
        raise InvalidInput(f"{what}: {exc}") from None
