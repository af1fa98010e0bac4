"""Query-string parameters of the operator API and console (``urllib.parse.parse_qs`` output)."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["int_param", "list_param", "one_param", "time_param"]


def one_param(query: dict[str, list[str]], key: str) -> str | None:
    """The last value of ``key``, stripped; None when absent."""
    values = query.get(key)
    return values[-1].strip() if values else None


def list_param(query: dict[str, list[str]], key: str) -> list[str]:
    """Every value of ``key``, comma-separated values split, blanks dropped."""
    return [v.strip() for value in query.get(key, []) for v in value.split(",") if v.strip()]


def int_param(query: dict[str, list[str]], key: str, default: int) -> int:
    """``key`` as an integer (``default`` when absent). Raises ValueError naming it."""
    value = one_param(query, key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {value!r}") from None


def time_param(query: dict[str, list[str]], key: str) -> float | None:
    """A time parameter: epoch seconds, or ISO 8601 (a date, or a date and time; UTC unless
    it has an offset)."""
    value = one_param(query, key)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{key} must be epoch seconds or ISO 8601, got {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()
