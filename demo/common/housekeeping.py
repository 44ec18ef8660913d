"""Periodic clean-up of rows that no rule reads any more, of accounts whose deletion is final, of
blobs no image uses and of objects in the store without their row (run by main.py)."""

from __future__ import annotations

import datetime as dt
import logging

from demo.common.accounts import queries as accounts
from demo.common.images.rules import Images
from demo.common.infra import ratelimit
from demo.common.infra.db import Database, SqlCursor, idempotent, long_work, sql_unit
from demo.common.sms import queries as sms

log = logging.getLogger("demo.housekeeping")
KEEP = dt.timedelta(days=1)  # expired rows linger a day: enough for support to see what happened
# Accounts purged per round at most: a round stays short however many deletions fell due at once (the
# rest wait for the next round; logins already treat them as gone).
PURGE_BATCH = 100


async def run(db: Database, images: Images, now: dt.datetime) -> dict[str, int]:
    """One round, off the loop. Blobs are collected here too, after the purge: images also go without
    the API (an account purged, a user deleted by SQL), and their blobs must not wait for a restart."""
    counts = await db.run(sweep, now)
    counts["purged_users"] = await purge_deleted(db, now)
    counts["unused_blobs"] = await db.offloader.db(images.collect_unused)
    counts.update(await db.offloader.db(images.collect_orphans))  # after: what the purge left is collected first
    return counts


async def purge_deleted(db: Database, now: dt.datetime) -> int:
    """Purge the accounts whose deletion is final (at most ``PURGE_BATCH``), one unit of work each; how
    many. Their blobs are left to ``Images.collect_unused``."""
    purged = 0
    for user_id in await db.run(accounts.due_deletions, now, PURGE_BATCH):
        try:
            purged += await db.run(accounts.purge_user, user_id, now)
        except Exception:  # the next round tries it again; the others, and the sweeps after, go on
            log.warning("purging user %s failed", user_id, exc_info=True)
    return purged


@sql_unit
@idempotent  # deletes expired rows: a re-run finds fewer (the counts are only logged)
@long_work
def sweep(c: SqlCursor, now: dt.datetime) -> dict[str, int]:
    """One unit of work: the rows of each feature that expired (``KEEP`` ago for the kept ones)."""
    return {
        "rate_counters": ratelimit.sweep(c, now),
        "sms_counted": sms.keep_counts(c, now - KEEP),  # the codes of the texts deleted next, kept as counts
        "sms_outbox": sms.sweep(c, now - KEEP),
        "sms_codes": accounts.sweep_codes(c, now - KEEP),  # never one whose text is still waiting
        "auth_sessions": accounts.sweep_sessions(c, now - KEEP),
    }
