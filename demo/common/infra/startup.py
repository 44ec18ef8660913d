"""Why the server refuses to start, as one line and an exit status per kind of problem.

Exit statuses (README, "Exit statuses"): 2 a bad setting, 3 the database is unreachable or its
migration failed, 4 the address cannot be bound, 5 a folder or file cannot be written. A supervisor
restarting the process for ever can tell a typo (2) from a database that is not up yet (3).
"""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError


class StartupError(RuntimeError):
    """The server cannot start; ``status`` is the process's exit status."""

    status = 1


class ConfigError(StartupError):
    """The settings are unsafe or inconsistent."""

    status = 2


class DatabaseUnavailable(StartupError):
    """The database does not answer, or bringing its schema up to date failed."""

    status = 3


class CannotListen(StartupError):
    """The address and port cannot be bound (in use, not an address of this machine, privileged)."""

    status = 4


class StorageUnusable(StartupError):
    """A folder the server writes to (logs, media, the SQLite file, the SMS outbox) is not writable."""

    status = 5


def masked_url(url: str) -> str:
    """The database URL as it may be printed: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(not a database URL)"  # may hold a password in a place we cannot find


def reason(error: BaseException) -> str:
    """The driver's own words for a database error (SQLAlchemy's text adds the SQL and a link)."""
    orig = getattr(error, "orig", None)
    if orig is not None and orig.args:
        return str(orig.args[-1])
    return str(orig or error).splitlines()[0]
