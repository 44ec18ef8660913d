"""Time, injectable: services take a ``Clock`` so tests move time instead of sleeping."""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """Naive UTC, second precision dropped to microseconds: what the database columns hold."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Clock:
    def now(self) -> dt.datetime:
        return utcnow()

    def timestamp(self) -> float:
        return self.now().replace(tzinfo=dt.UTC).timestamp()


def isoformat(moment: dt.datetime | None) -> str | None:
    """The contract's time format: ISO 8601 UTC with a Z, whole seconds."""
    if moment is None:
        return None
    return moment.replace(microsecond=0).isoformat() + "Z"
