"""Periodic clean-up of rows that no rule reads any more, and of blobs no image uses (run by main.py)."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, exists
from sqlalchemy.orm import Session

from demo.common.sms import outbox
from demo.common.infra import ratelimit
from demo.common.infra.db import Database
from demo.common.images.rules import Images
from demo.models import AuthSession, SmsCode, SmsOutbox

KEEP = dt.timedelta(days=1)  # expired rows linger a day: enough for support to see what happened


async def run(db: Database, images: Images, now: dt.datetime) -> dict[str, int]:
    """One round, off the loop. Blobs are collected here too: images also go without the API (a user
    deleted by SQL cascades to its images), and their blobs must not wait for a restart."""
    counts = await db.run(sweep, now)
    counts["unused_blobs"] = await db.offloader.db(images.collect_unused)
    return counts


def sweep(session: Session, now: dt.datetime) -> dict[str, int]:
    # A code's outbox rows go with it (ON DELETE CASCADE): never one the sender has not finished with.
    waiting_text = exists().where(SmsOutbox.sms_code_id == SmsCode.id, SmsOutbox.status.in_(outbox.WAITING))
    return {
        "rate_counters": ratelimit.sweep(session, now),
        "sms_outbox": outbox.sweep(session, now - KEEP),
        "sms_codes": session.execute(delete(SmsCode).where(SmsCode.expires_at < now - KEEP, ~waiting_text)).rowcount,
        "auth_sessions": session.execute(delete(AuthSession).where(AuthSession.expires_at < now - KEEP)).rowcount,
    }
