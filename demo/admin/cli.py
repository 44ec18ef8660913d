"""What the command groups ``users``, ``sms`` and ``images`` share: their exit statuses, the settings, the
database, and the output (human-readable lines, or one JSON document with ``--json``).

Every way of failing is a ``CommandError``: one line on stderr, ``COMMAND: message``, and its status.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import phonenumbers
from sqlalchemy.exc import SQLAlchemyError

from demo.common.accounts.phones import mask_phone
from demo.common.errors import Unavailable
from demo.common.images.storage import StoreUnavailable
from demo.common.infra import migrate
from demo.common.infra.db import Database, engine_for
from demo.common.infra.offload import Offloader
from demo.common.infra.startup import ConfigError, DatabaseUnavailable, StorageUnusable, masked_url, reason
from demo.conf import settings as config

T = TypeVar("T")

# As the server's and copy-media's where they mean the same (demo/common/infra/startup.py).
BAD_INPUT, DATABASE_DOWN, STORE_DOWN = ConfigError.status, DatabaseUnavailable.status, StorageUnusable.status
DONE, FAILED, NOT_FOUND, INTERRUPTED = 0, 1, 4, 130

EXIT_STATUSES = """\
exit statuses:
  0    done
  1    the work failed part way (what failed is on stderr)
  2    bad arguments or settings: an unknown option, a bad phone number or id, a bad value
  3    the database (database_url) does not answer
  4    no such user
  5    the image store cannot be reached
  130  interrupted
"""


class CommandError(Exception):
    """A command that cannot go on: ``message`` (one line) and the exit ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def add_group(commands: Any, name: str, help: str, description: str) -> Any:
    """A command group (``users``, ``sms``, ``images``) and the subparsers of its commands."""
    group = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    return group.add_subparsers(title="commands", metavar="COMMAND", required=True)


def add_command(subcommands: Any, name: str, help: str, run: Callable[..., int], prog: str) -> Any:
    """One command of a group, with ``--json``; ``run(args, settings)`` is called with the settings."""
    parser = subcommands.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog="Settings are given as for python -m demo.main (--database_url=..., DEMO_DATABASE_URL, "
        "--config=FILE).\n\n" + EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
    parser.set_defaults(run=lambda args, settings_args: main(prog, run, args, settings_args))
    return parser


def main(prog: str, run: Callable[..., int], args: argparse.Namespace, settings_args: list[str]) -> int:
    """Load the settings, run the command, and turn each way of failing into one line and a status."""
    # Errors only: a store's or the database's warnings repeat what the command's own line says once.
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    try:
        settings = load_settings(settings_args)
        return run(args, settings)
    except CommandError as error:
        return fail(prog, error.status, error.message)
    except KeyboardInterrupt:
        return fail(prog, INTERRUPTED, "interrupted")


def fail(prog: str, status: int, message: str) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return status


def load_settings(settings_args: list[str]) -> config.Settings:
    """The settings as the server reads them (command line, DEMO_* environment, --config file)."""
    stray = [arg for arg in settings_args if not arg.startswith("--")]
    if stray:
        raise CommandError(BAD_INPUT, f"unexpected argument {stray[0]!r}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # tornado prints every setting's help on a bad name
            return config.load(settings_args)
    except config.OptionsError as error:
        raise CommandError(BAD_INPUT, str(error)) from None


class Db:
    """The server's database for a command: one connection, units run on this thread."""

    def __init__(self, database: Database, url: str) -> None:
        self.database = database
        self.url = url

    def run(self, unit: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One unit of work; CommandError(3) when the database does not answer."""
        try:
            return self.database.run_sync(_with_keywords(unit, kwargs) if kwargs else unit, *args)
        except StoreUnavailable:
            raise  # a unit that also calls the store (the blob sweep): the caller says which store
        except (SQLAlchemyError, Unavailable) as error:
            cause = error.__cause__ or error
            raise CommandError(DATABASE_DOWN, f"database {masked_url(self.url)}: {reason(cause)}") from None


@contextlib.contextmanager
def database(settings: config.Settings) -> Iterator[Db]:
    try:
        engine = engine_for(settings, pool_size=1)
    except (SQLAlchemyError, ValueError) as error:  # a URL SQLAlchemy cannot parse
        raise CommandError(BAD_INPUT, f"--database_url: {error}") from None
    try:
        current, head = migrate.schema_revision(engine)
    except SQLAlchemyError as error:
        engine.dispose()
        raise CommandError(DATABASE_DOWN, f"database {masked_url(settings.database_url)}: {reason(error)}") from None
    if current != head:  # the commands speak this release's schema: no table yet, or an older one
        engine.dispose()
        where = f"database {masked_url(settings.database_url)}"
        needs = f"has schema {current or 'none'}, this release needs {head}"
        raise CommandError(BAD_INPUT, f"{where} {needs}: migrate it first (README: Upgrades)")
    offloader = Offloader(db_threads=1, cpu_threads=1, io_threads=1)  # unused: units run on this thread
    try:
        yield Db(Database(engine, offloader), settings.database_url)
    finally:
        offloader.shutdown()
        engine.dispose()


def _with_keywords(unit: Callable[..., T], kwargs: dict[str, Any]) -> Callable[..., T]:
    def call(c: Any, *args: Any) -> T:
        return unit(c, *args, **kwargs)

    call.__dict__.update(unit.__dict__)  # keeps the sql_unit mark: it runs on a cursor
    return call


def output(args: argparse.Namespace, lines: list[str], document: dict[str, Any]) -> None:
    """``lines`` for a person, or ``document`` as JSON with ``--json``."""
    if args.json:
        print(json.dumps(document, ensure_ascii=False, indent=2))
    else:
        print("\n".join(lines))


def store_down(store: object, error: BaseException) -> CommandError:
    """Exit 5 for a store that does not answer, with the first line of why (a client's error may
    run to pages)."""
    cause = (str(error.__cause__ or error).splitlines() or [type(error).__name__])[0]
    return CommandError(STORE_DOWN, f"the store {store} does not answer ({cause})")


def masked(phone: str) -> str:
    """``+8618800000001`` -> ``+86 188****0001``: enough to recognise a number, not to call it."""
    return f"+{phonenumbers.parse(phone).country_code} {mask_phone(phone)}"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
