"""``python -m demo.admin users ...``: find, show, disable and enable an account, delete it (the path of
DELETE /users/me), end its sessions, export its data (the zip of GET /users/me/export).

Users are named by their public id (what the API and ``users find`` show); phones are shown masked.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from demo.admin import cli
from demo.admin.cli import BAD_INPUT, DONE, NOT_FOUND, STORE_DOWN, CommandError
from demo.common.accounts import queries
from demo.common.accounts.export import Export, zip_pieces
from demo.common.accounts.phones import normalize_phone
from demo.common.errors import InvalidPhone
from demo.common.images.storage import StoreError, StoreUnavailable, make_store
from demo.common.infra.clock import Clock, isoformat
from demo.common.infra.db import Row
from demo.conf.settings import Settings

NAME = "users"
PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # tokens.new_public_id: 16 random bytes, URL-safe base64


def add_parser(commands: Any) -> None:
    """Register ``users`` and its commands on the subparsers of python -m demo.admin."""
    group = cli.add_group(
        commands,
        NAME,
        help="find, show, disable, enable, delete an account; end its sessions; export its data",
        description="An account's commands. A user is named by its public id (as the API and "
        "'users find' show it); phone numbers are shown masked.",
    )
    find = cli.add_command(group, "find", "find the account of a phone number", _find, "users find")
    find.add_argument("phone", metavar="PHONE", help="E.164 (+8618800000001), or national in default_region")
    for name, help_, run in (
        ("show", "show an account", _show),
        ("disable", "disable an account: every session ends, and its logins are refused", _disable),
        ("enable", "enable a disabled account again", _enable),
        ("end-sessions", "end every session of an account (app tokens, H5 tickets and cookies)", _end_sessions),
    ):
        cli.add_command(group, name, help_, run, f"users {name}").add_argument("id", metavar="ID", help="public id")
    delete = cli.add_command(
        group,
        "delete",
        "delete an account as DELETE /users/me does: every session ends, and it is purged after the grace "
        "period (account_deletion_grace) unless its owner logs in meanwhile",
        _delete,
        "users delete",
    )
    delete.add_argument("id", metavar="ID", help="public id")
    delete.add_argument(
        "--now", action="store_true", help="no grace period: final at once, and purged now (its blobs go at the sweep)"
    )
    export = cli.add_command(
        group, "export", "write an account's data to a zip, as GET /users/me/export makes it", _export, "users export"
    )
    export.add_argument("id", metavar="ID", help="public id")
    export.add_argument("--out", required=True, metavar="FILE.zip", help="the zip to write (must not exist)")
    export.add_argument("--quiet", action="store_true", help="no progress bar")


def _user(db: cli.Db, public_id: str, now: dt.datetime) -> Row:
    if not PUBLIC_ID.fullmatch(public_id):
        raise CommandError(BAD_INPUT, f"{public_id!r}: not a user id (22 letters, digits, - or _)")
    row = db.run(queries.find_user, public_id=public_id, now=now)
    if row is None:
        raise CommandError(NOT_FOUND, f"no user {public_id}")
    return row


def _status(user: Row) -> str:
    if user.deletion_due_at is not None:
        return "deletion scheduled"
    if user.disabled_at is not None:
        return "disabled"
    return "frozen (its number went to a new holder)" if user.frozen_at is not None else "active"


def describe(user: Row) -> dict[str, Any]:
    """The account as the commands print it (phone masked)."""
    return {
        "id": user.public_id,
        "phone": cli.masked(user.phone or user.former_phone),  # a frozen account: the number it had
        "status": _status(user),
        "created_at": isoformat(user.created_at),
        "last_login_at": isoformat(user.last_login_at),
        "disabled_at": isoformat(user.disabled_at),
        "frozen_at": isoformat(user.frozen_at),
        "deletion_final_at": isoformat(user.deletion_due_at),
        "live_sessions": int(user.live_sessions),
        "images": int(user.image_count),
        "image_bytes": int(user.image_bytes),
        "h5_visit_count": int(user.h5_visit_count or 0),
        "h5_last_visit_at": isoformat(user.h5_last_visit_at),
    }


def _lines(user: dict[str, Any]) -> list[str]:
    labels = {
        "status": "status",
        "created_at": "created",
        "last_login_at": "last login",
        "disabled_at": "disabled since",
        "frozen_at": "frozen since",
        "deletion_final_at": "deletion final at",
        "live_sessions": "live sessions",
        "images": "images",
        "h5_visit_count": "H5 visits",
        "h5_last_visit_at": "last H5 visit",
    }
    lines = [f"user {user['id']}  {user['phone']}"]
    for key, label in labels.items():
        value = user[key]
        if value is None:
            continue
        if key == "images":
            value = f"{value} ({cli.human_bytes(user['image_bytes'])})"
        lines.append(f"  {label + ':':<19}{value}")
    return lines


def _find(args: argparse.Namespace, settings: Settings) -> int:
    try:
        phone = normalize_phone(args.phone, settings.default_region)
    except InvalidPhone:
        message = f"{args.phone!r}: not a mobile number (default_region {settings.default_region})"
        raise CommandError(BAD_INPUT, message) from None
    with cli.database(settings) as db:
        now = Clock().now()
        row = db.run(queries.find_user, phone=phone, now=now)
        frozen = [describe(r) for r in db.run(queries.frozen_off, phone, now)]
    if row is None and not frozen:
        raise CommandError(NOT_FOUND, f"no user with phone {cli.masked(phone)}")
    user = None if row is None else describe(row)
    lines = [] if user is None else _lines(user)
    for account in frozen:  # the number's former holders (recycled numbers): listed after its holder
        lines += _lines(account)
    cli.output(args, lines, {"user": user, "frozen": frozen})
    return DONE


def _show(args: argparse.Namespace, settings: Settings) -> int:
    with cli.database(settings) as db:
        user = describe(_user(db, args.id, Clock().now()))
    cli.output(args, _lines(user), {"user": user})
    return DONE


def _set_disabled(args: argparse.Namespace, settings: Settings, disabled: bool) -> int:
    now = Clock().now()
    with cli.database(settings) as db:
        user = _user(db, args.id, now)
        changed, ended = db.run(queries.set_disabled, user.id, disabled, now)
    word = "disabled" if disabled else "enabled"
    line = f"user {user.public_id} {word}" if changed else f"user {user.public_id} was {word} already"
    if disabled:
        line += f"; {ended} sessions ended"
    cli.output(args, [line], {"id": user.public_id, "disabled": disabled, "changed": changed, "sessions_ended": ended})
    return DONE


def _disable(args: argparse.Namespace, settings: Settings) -> int:
    return _set_disabled(args, settings, True)


def _enable(args: argparse.Namespace, settings: Settings) -> int:
    return _set_disabled(args, settings, False)


def _end_sessions(args: argparse.Namespace, settings: Settings) -> int:
    now = Clock().now()
    with cli.database(settings) as db:
        user = _user(db, args.id, now)
        ended = db.run(queries.end_all_sessions, user.id, now)
    cli.output(
        args, [f"user {user.public_id}: {ended} sessions ended"], {"id": user.public_id, "sessions_ended": ended}
    )
    return DONE


def _delete(args: argparse.Namespace, settings: Settings) -> int:
    now = Clock().now()
    due_at = now if args.now else now + dt.timedelta(seconds=settings.account_deletion_grace)
    with cli.database(settings) as db:
        user = _user(db, args.id, now)
        final_at, ended = db.run(queries.schedule_deletion_by_operator, user.id, due_at, now)
        purged = bool(args.now) and db.run(queries.purge_user, user.id, now)
    if final_at is None:  # deleted by another process between the two units
        raise CommandError(NOT_FOUND, f"no user {args.id}")
    if purged:
        line = f"user {user.public_id} deleted and purged; {ended} sessions ended (its blobs go at the next sweep)"
    else:
        line = f"user {user.public_id} will be deleted at {isoformat(final_at)} unless its owner logs in before"
        line += f"; {ended} sessions ended"
    document = {"id": user.public_id, "final_at": isoformat(final_at), "purged": purged, "sessions_ended": ended}
    cli.output(args, [line], document)
    return DONE


def _export(args: argparse.Namespace, settings: Settings) -> int:
    out = Path(args.out)
    if out.exists() or out.is_symlink():
        raise CommandError(BAD_INPUT, f"--out {out}: exists already (remove it, or name another file)")
    if not out.parent.is_dir():
        raise CommandError(BAD_INPUT, f"--out {out}: no such folder {out.parent}")
    try:
        store = make_store(settings)
    except StoreError as error:
        raise CommandError(BAD_INPUT, str(error)) from None
    except OSError as error:  # the temp folder of uploads under media_root
        raise CommandError(STORE_DOWN, f"--media_root: {error.strerror or error}: {settings.media_root}") from None
    now = Clock().now()
    with cli.database(settings) as db:
        user = _user(db, args.id, now)
        data = db.run(queries.export_data, user.id, None, now)  # not limited: the operator's
    if data is None:  # deleted by another process between the two units
        raise CommandError(NOT_FOUND, f"no user {args.id}")
    export = Export(data, now)
    total = sum(int(image.bytes) for image in export.data.images)
    # Written beside the target and renamed when whole: an interrupted export leaves no half zip.
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    written = 0
    try:
        with os.fdopen(fd, "wb") as file, _bar(total, args.quiet) as bar:
            for piece in zip_pieces(export, store):
                file.write(piece)
                written += len(piece)
                bar.update(min(len(piece), total - bar.n))
        os.replace(partial, out)
    except StoreUnavailable as error:
        raise cli.store_down(store, error) from None
    except OSError as error:
        raise CommandError(cli.FAILED, f"--out {out}: {error.strerror or error}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    images = len(export.data.images)
    line = f"user {user.public_id}: {images} images and profile.json, {cli.human_bytes(written)} -> {out}"
    cli.output(args, [line], {"id": user.public_id, "images": images, "bytes": written, "out": str(out)})
    return DONE


def _bar(total: int, quiet: bool) -> tqdm[Any]:
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=quiet, desc="users export"
    )
