"""demo/common/sms/queries.py: the outbox's units of work on SQLite and MariaDB, without a sender."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from demo.common.sms import queries
from demo.models import SmsCode, SmsOutbox
from tests.helpers import sql_cursor

NOW = dt.datetime(2026, 11, 22, 10, 0, 0, 123456)
LEASE = NOW + dt.timedelta(minutes=1)


@pytest.fixture
def db(app):
    return app.services.db


def queue(db, text: str | None = "hello", code_ttl: int = 300, phone: str = "+8618866668888") -> int:
    """A code and its text; the outbox row's id."""

    def work(s):
        code = SmsCode(
            phone=phone,
            purpose="regist",
            code_hash="h",
            created_at=NOW,
            attempts=0,
            expires_at=NOW + dt.timedelta(seconds=code_ttl),
        )
        s.add(code)
        s.flush()
        queries.enqueue(sql_cursor(s), code.id, phone, "regist", NOW, text=text, code="123456" if text else None)
        return s.scalar(select(SmsOutbox.id).where(SmsOutbox.sms_code_id == code.id))

    return db.run_sync(work)


def rows(db) -> list[SmsOutbox]:
    return db.run_sync(lambda s: list(s.scalars(select(SmsOutbox).order_by(SmsOutbox.id))))


def test_enqueue_and_backlog(db):
    queue(db)
    queue(db, text=None)
    assert [(r.status, r.code, r.text, r.attempts, r.next_attempt_at, r.created_at) for r in rows(db)] == [
        ("pending", "123456", "hello", 0, NOW, NOW),
        ("skipped", None, "", 0, NOW, NOW),
    ]
    assert db.run_sync(queries.backlog) == 1


def test_claim_due_claims_live_texts_and_settles_dead_ones_unsent(db):
    live = queue(db)
    dead = queue(db, code_ttl=0)
    queue(db, text=None)
    found = db.run_sync(queries.claim_due, NOW, LEASE, 10)
    assert [(r.id, r.attempts, r.phone, r.purpose, r.code, r.text, r.created_at) for r in found.claimed] == [
        (live, 1, "+8618866668888", "regist", "123456", "hello", NOW)
    ]
    assert [r.id for r in found.dead] == [dead] and found.backlog == 1
    by_id = {r.id: r for r in rows(db)}
    assert (by_id[live].status, by_id[live].attempts, by_id[live].next_attempt_at) == ("sending", 1, LEASE)
    assert (by_id[dead].status, by_id[dead].code, by_id[dead].text) == ("failed", None, "")
    again = db.run_sync(queries.claim_due, NOW, LEASE, 10)
    assert again.claimed == [] and again.dead == []  # claimed until the lease runs out
    assert [r.attempts for r in db.run_sync(queries.claim_due, LEASE, LEASE, 10).claimed] == [2]


def test_claim_due_takes_at_most_a_batch(db):
    for _ in range(3):
        queue(db)
    assert len(db.run_sync(queries.claim_due, NOW, LEASE, 2).claimed) == 2


def test_settle_records_each_outcome_and_voids_the_code_of_a_text_given_up(db):
    sent, retried, failed, stale = (queue(db) for _ in range(4))
    claimed = {r.id: r for r in db.run_sync(queries.claim_due, NOW, LEASE, 10).claimed}

    def outcome(id_: int, status: str, **kw: object) -> queries.Outcome:
        return queries.Outcome(id_, claimed[id_].attempts, claimed[id_].sms_code_id, status, **kw)

    given_up = db.run_sync(
        queries.settle,
        [
            outcome(sent, queries.SENT),
            outcome(retried, queries.PENDING, error="E", retry_at=LEASE),
            outcome(failed, queries.FAILED, error="F"),
            queries.Outcome(stale, 7, claimed[stale].sms_code_id, queries.FAILED, "G"),  # a later claim's try
        ],
        NOW,
    )
    assert [o.id for o in given_up] == [failed]
    by_id = {r.id: r for r in rows(db)}
    assert (by_id[sent].status, by_id[sent].sent_at, by_id[sent].code, by_id[sent].text) == ("sent", NOW, None, "")
    assert (by_id[retried].status, by_id[retried].next_attempt_at, by_id[retried].last_error) == ("pending", LEASE, "E")
    assert (by_id[failed].status, by_id[failed].code, by_id[failed].last_error) == ("failed", None, "F")
    assert by_id[stale].status == "sending"
    expiry = db.run_sync(lambda s: dict(s.execute(select(SmsCode.id, SmsCode.expires_at)).all()))
    assert expiry[by_id[failed].sms_code_id] == NOW and expiry[by_id[stale].sms_code_id] > NOW


def test_sweep_deletes_finished_rows_only(db):
    queue(db)
    queue(db, text=None)
    assert db.run_sync(queries.sweep, NOW) == 0
    assert db.run_sync(queries.sweep, NOW + dt.timedelta(microseconds=1)) == 1
    assert [r.status for r in rows(db)] == ["pending"]
