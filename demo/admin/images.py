"""``python -m demo.admin images stats`` and ``images gc [--dry-run]``: what the images weigh, and the
blob sweep run now (housekeeping runs it every round: this is for an operator who cannot wait).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tqdm import tqdm

from demo.admin import cli
from demo.admin.cli import BAD_INPUT, DONE, FAILED, STORE_DOWN, CommandError
from demo.common.images import queries
from demo.common.images.rules import THUMBNAIL_WIDTHS, StoreMismatch, bind_store
from demo.common.images.storage import ImageStore, StoreError, StoreUnavailable, make_store
from demo.common.infra.clock import Clock
from demo.conf.settings import Settings

NAME = "images"


def add_parser(commands: Any) -> None:
    """Register ``images`` and its commands on the subparsers of python -m demo.admin."""
    group = cli.add_group(commands, NAME, help="image statistics and the blob sweep", description=__doc__ or "")
    cli.add_command(
        group, "stats", "images, blobs, bytes, orphan blobs (no image uses them) and thumbnails", _stats, "images stats"
    )
    gc = cli.add_command(
        group,
        "gc",
        "remove the orphan blobs now (the file or object, its thumbnails, its row), as housekeeping does",
        _gc,
        "images gc",
    )
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    gc.add_argument("--quiet", action="store_true", help="no progress bar")


def _stats(args: argparse.Namespace, settings: Settings) -> int:
    with cli.database(settings) as db:
        row = db.run(queries.stats)
    orphans = "'images gc' removes them"
    document = {name: int(getattr(row, name)) for name in row._fields}
    lines = [
        f"images:       {document['images']} ({cli.human_bytes(document['image_bytes'])})",
        f"blobs:        {document['blobs']} ({cli.human_bytes(document['blob_bytes'])}; one per content)",
        f"orphan blobs: {document['orphan_blobs']} ({cli.human_bytes(document['orphan_bytes'])}; {orphans})",
        f"thumbnails:   {document['thumbnails']} ({cli.human_bytes(document['thumbnail_bytes'])})",
    ]
    cli.output(args, lines, document)
    return DONE


def _store(settings: Settings) -> ImageStore:
    try:
        return make_store(settings)
    except StoreError as error:
        raise CommandError(BAD_INPUT, str(error)) from None
    except OSError as error:  # the temp folder of uploads under media_root
        raise CommandError(STORE_DOWN, f"--media_root: {error.strerror or error}: {settings.media_root}") from None


def _gc(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    with cli.database(settings) as db:
        unused = db.run(queries.unused_blob_sizes)
        size = sum(int(row.bytes or 0) for row in unused)
        if args.dry_run:
            line = f"images gc: would remove {len(unused)} orphan blobs ({cli.human_bytes(size)}); nothing removed"
            cli.output(args, [line], {"orphan_blobs": len(unused), "bytes": size, "removed": 0, "dry_run": True})
            return DONE
        try:
            # Never from a store that belongs to another database (as the server's sweep: Images.bind).
            bind_store(db.database, store, Clock().now())
        except StoreMismatch as error:
            raise CommandError(BAD_INPUT, str(error)) from None
        except StoreUnavailable as error:
            raise cli.store_down(store, error) from None
        removed, freed, failed = 0, 0, []

        def remove(sha256: str) -> None:
            store.delete(sha256, THUMBNAIL_WIDTHS)

        with tqdm(
            total=len(unused), unit="blob", file=sys.stderr, disable=args.quiet or not unused, desc="images gc"
        ) as bar:
            for row in unused:
                try:
                    # Checked again under the blob's lock: an upload of the same bytes may have used it since.
                    if db.run(queries.drop_blob_if_unused, row.sha256, remove):
                        removed, freed = removed + 1, freed + int(row.bytes or 0)
                except StoreUnavailable as error:
                    failed.append(row.sha256)
                    bar.write(f"images gc: {row.sha256}: {cli.store_down(store, error).message}", file=sys.stderr)
                except OSError as error:  # a folder's file that cannot be removed: its row stays too
                    failed.append(row.sha256)
                    bar.write(
                        f"images gc: {row.sha256}: {error.strerror or error}: {error.filename or store}",
                        file=sys.stderr,
                    )
                bar.update(1)
    line = f"images gc: removed {removed} orphan blobs ({cli.human_bytes(freed)})"
    if failed:
        line += f"; {len(failed)} could not be removed (named above): run it again once fixed"
    cli.output(args, [line], {"orphan_blobs": len(unused), "removed": removed, "bytes": freed, "failed": failed})
    return FAILED if failed else DONE
