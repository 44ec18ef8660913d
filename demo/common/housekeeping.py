"""Periodic clean-up of rows that no rule reads any more (run off the loop by main.py)."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import delete
from sqlalchemy.orm import Session

from demo.common import outbox, ratelimit
from demo.models import AuthSession, SmsCode

KEEP = dt.timedelta(days=1)  # expired rows linger a day: enough for support to see what happened


def sweep(session: Session, now: dt.datetime) -> dict[str, int]:
    return {
        "rate_counters": ratelimit.sweep(session, now),
        "sms_outbox": outbox.sweep(session, now - KEEP),
        "sms_codes": session.execute(delete(SmsCode).where(SmsCode.expires_at < now - KEEP)).rowcount,
        "auth_sessions": session.execute(delete(AuthSession).where(AuthSession.expires_at < now - KEEP)).rowcount,
    }
