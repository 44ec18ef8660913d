"""``python -m demo.admin copy-media --from=FOLDER [--final]``: copy a media folder into the store the
settings name.

The copy itself (verification, resumption, the deployment id claimed by the final run) is
demo/common/images/transfer.py; this module reads the arguments and settings, draws the progress bar
and turns each way of failing into one line and an exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from tqdm import tqdm

from demo.common.errors import Unavailable
from demo.common.images import queries, transfer
from demo.common.images.storage import ImageStore, StoreError, StoreUnavailable, make_store
from demo.common.infra.db import Database, engine_for
from demo.common.infra.offload import Offloader
from demo.common.infra.startup import ConfigError, DatabaseUnavailable, StorageUnusable, masked_url, reason
from demo.conf import settings as config

NAME = "copy-media"
JOBS = 4  # store calls block on the network: a few threads keep it busy; memory is a chunk per thread
MAX_JOBS = 64
STORE_SETTINGS = ("storage", "s3_endpoint", "s3_region", "s3_virtual_hosted", "s3_connect_timeout", "s3_timeout")
DONE, FAILED, INTERRUPTED = 0, 1, 130
# As the server's (demo/common/infra/startup.py): 2 a setting is wrong, 5 the storage cannot be used.
BAD_SETTINGS, UNREACHABLE = ConfigError.status, StorageUnusable.status

DESCRIPTION = """\
Copy a media folder (the local store's blobs/, thumbs/ and DEPLOYMENT) into the store the settings
name, e.g. --storage=s3://bucket/prefix --s3_endpoint=https://... with AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY in the environment. Settings are read as python -m demo.main reads them
(--name=value, DEMO_NAME, --config=FILE): pass the server's own.

Every blob's bytes must hash to its name (a corrupt one is reported, not copied), and each object in
the store must be the folder's: by its ETag where that is the MD5 of the bytes (S3 single PUTs: no
bytes downloaded), else read back and hashed. Objects already in the store are checked so and
skipped, never replaced: run it again after an interruption and it carries on (--verify-existing
reads every one of them back).

To move: run it while the old servers still serve (most bytes move), stop them, then run it again
with --final. Only --final writes the folder's deployment id to the store, last, once every object
checked out; until then the server refuses to start on the store, so it never serves a copy that
misses the images uploaded since the first run. Before that, --final deletes the store's blobs and
thumbnails that the folder no longer has (images deleted since the first run), unless the store is
claimed by this deployment already (it is live: nothing is deleted), and it checks that every blob
the server's database (database_url) uses is in the folder: one that is not would be an image lost for
good once the store is live.
"""

EXIT_STATUSES = """\
exit statuses:
  0    every object is in the store and verified (with --final: the deployment id claimed)
  1    some object failed verification or could not be read, or (--final) the database's images use a
       blob the folder lacks (listed on stderr); the id is not claimed
  2    bad arguments or settings: no such folder, not a media folder, a bad storage URL,
       or a store that belongs to another deployment
  3    --final: the database (database_url) does not answer
  5    the store cannot be reached (or the local temp folder under media_root not written)
  130  interrupted; run it again to continue
"""


def add_parser(commands: Any) -> None:
    """Register the command on the subparsers of python -m demo.admin."""
    helps = {d.name: d.help for d in config.DECLARED}
    settings = "\n".join(
        f"  --{name}\n" + textwrap.fill(helps[name], 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        for name in (*STORE_SETTINGS, "media_root", "database_url")
    )
    parser = commands.add_parser(
        NAME,
        help="copy a media folder into the store the settings name (verified, resumable)",
        description=DESCRIPTION,
        epilog=f"the settings it uses:\n{settings}\n\n{EXIT_STATUSES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--from", dest="source", required=True, metavar="FOLDER", help="the media folder, e.g. /var/lib/demo/media"
    )
    parser.add_argument(
        "--final",
        action="store_true",
        help="the run after the old servers stopped: claim the store for the folder's deployment",
    )
    parser.add_argument(
        "--verify-existing",
        action="store_true",
        help="read back and hash the objects already in the store, even those whose ETag vouches for them",
    )
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"objects copied at once (default {JOBS})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (problems and the summary still print)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, settings_args: list[str]) -> int:
    # Errors only: the store's warnings (one per failed call, on every thread) repeat what the command's
    # own line says once.
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    if not 1 <= args.jobs <= MAX_JOBS:
        return fail(BAD_SETTINGS, f"--jobs={args.jobs}: must be from 1 to {MAX_JOBS}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # tornado prints every setting's help on a bad name
            settings = config.load(settings_args)
    except config.OptionsError as error:
        return fail(BAD_SETTINGS, str(error))
    try:
        _check_ranges(settings)
        source = transfer.Source.open(args.source)
        store = make_store(settings)
    except (ConfigError, StoreError, transfer.SourceError) as error:
        return fail(BAD_SETTINGS, str(error))
    except OSError as error:  # the temp folder of uploads under media_root
        return fail(UNREACHABLE, f"--media_root: {error.strerror or error}: {error.filename or settings.media_root}")
    missing_blobs = _database_check(settings) if args.final else None
    return copy(
        source,
        store,
        quiet=args.quiet,
        jobs=args.jobs,
        final=args.final,
        verify_existing=args.verify_existing,
        missing_blobs=missing_blobs,
    )


def _database_check(settings: config.Settings) -> Callable[[Callable[[str], bool]], list[str]]:
    """The final run's last check, on the server's database (``database_url``): the blobs its images
    use that the folder lacks. DatabaseUnavailable when it does not answer (exit 3, as the server)."""

    def missing_blobs(present: Callable[[str], bool]) -> list[str]:
        engine = engine_for(settings, pool_size=1, long_work=True)
        offloader = Offloader(db_threads=1)  # unused: the check runs on this thread (run_sync)
        try:
            return Database(engine, offloader).run_sync(queries.blobs_missing, present)
        except (SQLAlchemyError, Unavailable) as error:
            cause = error.__cause__ or error
            raise DatabaseUnavailable(f"database {masked_url(settings.database_url)}: {reason(cause)}") from None
        finally:
            offloader.shutdown()
            engine.dispose()

    return missing_blobs


def copy(
    source: transfer.Source,
    store: ImageStore,
    *,
    quiet: bool,
    jobs: int,
    final: bool,
    verify_existing: bool,
    missing_blobs: Callable[[Callable[[str], bool]], list[str]] | None = None,
) -> int:
    try:
        transfer.check_destination(source, store)  # the quick refusals, before a bar is drawn
    except (transfer.DeploymentMismatch, transfer.SourceError, StoreUnavailable) as error:
        return fail(*_failure(error, store))
    bar = tqdm(
        total=source.size, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=quiet, desc=NAME
    )
    finished = 0

    def done(outcome: transfer.Outcome) -> None:
        nonlocal finished
        finished += 1
        bar.set_postfix_str(f"{finished}/{source.count} files", refresh=False)
        bar.update(outcome.obj.size)
        if outcome.failed:
            bar.write(f"{NAME}: {outcome.result.value}: {outcome.obj.name}: {outcome.detail}", file=sys.stderr)

    try:
        with bar:
            summary = transfer.copy_media(
                source,
                store,
                jobs=jobs,
                final=final,
                verify_existing=verify_existing,
                done=done,
                missing_blobs=missing_blobs,
            )
    except DatabaseUnavailable as error:
        return fail(error.status, str(error))
    except (transfer.DeploymentMismatch, transfer.SourceError, StoreUnavailable, KeyboardInterrupt) as error:
        return fail(*_failure(error, store))  # the bar is closed by now: the line stands alone
    for problem in summary.problems:
        if problem.startswith("missing: "):  # the others were written as their objects finished
            print(f"{NAME}: {problem}", file=sys.stderr)
    print(f"{NAME} {source.root} -> {store}: {summary.line()}")
    return DONE if summary.failed == 0 else FAILED


def _failure(error: BaseException, store: ImageStore) -> tuple[int, str]:
    if isinstance(error, StoreUnavailable):
        cause = str(error.__cause__ or error).splitlines()[0]
        return UNREACHABLE, f"the store {store} does not answer ({cause}); what is copied stays: run it again"
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED, "interrupted; what is copied stays: run it again to continue"
    return BAD_SETTINGS, str(error)


def fail(status: int, message: str) -> int:
    print(f"{NAME}: {message}", file=sys.stderr)
    return status


def _check_ranges(settings: config.Settings) -> None:
    """The store's numbers within their declared bounds, as the server checks them (demo/conf/validate.py
    checks every setting, the cookie secret and the database too, which a copy of images does not need)."""
    for declared in config.DECLARED:
        value = getattr(settings, declared.name)
        if declared.name in STORE_SETTINGS and isinstance(value, float):
            low, high = declared.low, declared.high
            if not (low <= value and (high is None or value <= high)):  # written so that NaN is outside
                raise ConfigError(f"--{declared.name}={value}: must be from {low} to {high}")
