"""``python -m demo.admin sms stats`` and ``images stats`` / ``images gc`` as an operator runs them, on
SQLite and MariaDB (and, for the images, on a folder and on SeaweedFS)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from demo.common import housekeeping
from demo.common.images.storage import object_name
from demo.common.infra.clock import utcnow
from demo.models import Image, ImageBlob, SmsCode, SmsDailyCount, SmsOutbox
from tests.admin.test_copy_media import admin
from tests.common.images.support import fetch, jpeg, png, second_user, storage_env, uploaded
from tests.helpers import free_port, make_test_engine

gen_test = pytest.mark.gen_test(timeout=120)


def env_of(settings) -> dict[str, str]:
    return {
        "DEMO_DATABASE_URL": settings.database_url,
        "DEMO_MEDIA_ROOT": settings.media_root,
        **storage_env({"storage": settings.storage, "s3_endpoint": settings.s3_endpoint}),
    }


def add_texts(database_url: str, texts: list[tuple[str, int, str, bool]]) -> None:
    """Codes and their outbox rows: (phone, days ago, outbox status, used), made at noon UTC."""
    engine = make_test_engine(database_url)
    today = dt.datetime.combine(utcnow().date(), dt.time(12))
    with Session(engine) as s, s.begin():
        for phone, days_ago, status, used in texts:
            at = today - dt.timedelta(days=days_ago)
            code = SmsCode(
                phone=phone,
                purpose="regist",
                code_hash="h" * 64,
                created_at=at,
                expires_at=at + dt.timedelta(minutes=5),
                attempts=0,
                used_at=at + dt.timedelta(minutes=1) if used else None,
            )
            s.add(code)
            s.flush()
            s.add(
                SmsOutbox(
                    sms_code_id=code.id,
                    phone=phone,
                    purpose="regist",
                    text="",
                    status=status,
                    attempts=1,
                    next_attempt_at=at,
                    created_at=at,
                )
            )
        # A notice (no code: an empty hash) is a text, not a code: not counted.
        notice = SmsCode(
            phone="+8618800000009", purpose="phone_notice", code_hash="", created_at=today, expires_at=today
        )
        s.add(notice)
        s.flush()
        s.add(
            SmsOutbox(
                sms_code_id=notice.id,
                phone=notice.phone,
                purpose="phone_notice",
                text="",
                status="sent",
                attempts=1,
                next_attempt_at=today,
                created_at=today,
            )
        )
    engine.dispose()


def test_sms_stats_count_sent_and_used_codes_per_day_and_country(database_url):
    cn, us, gb = "+8618800000001", "+12015550123", "+447400123456"
    add_texts(
        database_url,
        [
            (cn, 0, "sent", True),
            (cn, 0, "sent", True),
            (cn, 0, "sent", False),
            (cn, 0, "skipped", False),  # a test number or a phone without an account: nothing went out
            (cn, 0, "failed", False),
            (us, 0, "sent", False),
            (gb, 1, "sent", True),
            (cn, 1, "pending", False),
            (cn, 5, "sent", True),  # before --days 2
        ],
    )
    env = {"DEMO_DATABASE_URL": database_url}
    today, yesterday = utcnow().date(), utcnow().date() - dt.timedelta(days=1)

    done = admin("sms", "stats", "--days", "2", "--json", env=env)

    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    stats = json.loads(done.stdout)
    assert stats["since"] == yesterday.isoformat()
    assert stats["days"] == [
        {"day": yesterday.isoformat(), "country": "GB", "calling_code": "+44", "sent": 1, "used": 1, "conversion": 1.0},
        {"day": today.isoformat(), "country": "US", "calling_code": "+1", "sent": 1, "used": 0, "conversion": 0.0},
        {"day": today.isoformat(), "country": "CN", "calling_code": "+86", "sent": 3, "used": 2, "conversion": 0.6667},
    ]
    assert stats["total"] == {"sent": 5, "used": 3, "conversion": 0.6}

    human = admin("sms", "stats", "--days=7", env=env)
    assert human.returncode == 0
    lines = human.stdout.splitlines()
    assert lines[0].split() == ["day", "country", "sent", "used", "conversion"]
    assert f"{today.isoformat()}  CN (+86)" in human.stdout and "66.7%" in human.stdout
    assert lines[-2].split() == ["total", "6", "4", "66.7%"]


def test_sms_stats_outlive_the_texts_housekeeping_deletes_counted_once(app, database_url):
    cn, gb = "+8618800000001", "+447400123456"
    add_texts(
        database_url, [(cn, 3, "sent", True), (cn, 3, "sent", False), (gb, 3, "sent", True), (cn, 0, "sent", True)]
    )
    env = {"DEMO_DATABASE_URL": database_url}
    before = json.loads(admin("sms", "stats", "--json", env=env).stdout)

    # Two rounds: the first deletes the texts of three days ago (kept as counts), the second finds none.
    db, now = app.services.db, utcnow()
    first, second = db.run_sync(housekeeping.sweep, now), db.run_sync(housekeeping.sweep, now)

    assert (first["sms_counted"], first["sms_outbox"], second["sms_counted"]) == (3, 3, 0)
    after = json.loads(admin("sms", "stats", "--json", env=env).stdout)
    assert after == before and after["total"] == {"sent": 4, "used": 3, "conversion": 0.75}
    day = (utcnow().date() - dt.timedelta(days=3)).isoformat()
    assert [(d["day"], d["country"], d["sent"], d["used"]) for d in after["days"]][:2] == [
        (day, "GB", 1, 1),  # by calling code: +44, +86
        (day, "CN", 2, 1),
    ]
    assert db.run_sync(lambda s: s.scalar(select(func.count()).select_from(SmsDailyCount))) == 2
    assert json.loads(admin("sms", "stats", "--days=1", "--json", env=env).stdout)["total"]["sent"] == 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--days=0"], "sms stats: --days=0: must be from 1 to 366\n"),
        (["--days=400"], "sms stats: --days=400: must be from 1 to 366\n"),
        (["--days=week"], "python -m demo.admin sms stats: argument --days: invalid int value: 'week'"),
        (["--weeks=2"], "sms stats: --weeks=2: Unrecognized command line option"),
    ],
    ids=["zero", "too-many", "not-a-number", "unknown"],
)
def test_sms_stats_bad_input_is_one_line_and_exit_2(database_url, args, says):
    done = admin("sms", "stats", *args, env={"DEMO_DATABASE_URL": database_url})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(says) and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.usefixtures("storage")
@gen_test
async def test_images_stats_and_gc_remove_only_the_blobs_no_image_uses(api, user, outbox, settings, app):
    other = await second_user(api, outbox)
    shared, alone = jpeg((120, 90)), png((40, 30))
    mine = await uploaded(api, user.token, shared)
    theirs = await uploaded(api, other, shared)  # the same bytes: one blob for two images
    gone = await uploaded(api, user.token, alone)
    assert mine["sha256"] == theirs["sha256"]
    # Images deleted without the API (by SQL, or an account purged): their blobs wait for the sweep.
    db = app.services.db
    db.run_sync(lambda s: s.execute(delete(Image).where(Image.id.in_([mine["id"], gone["id"]]))))
    env = env_of(settings)

    stats = admin("images", "stats", "--json", env=env)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout) | {"thumbnails": 0, "thumbnail_bytes": 0} == {
        "images": 1,
        "image_bytes": theirs["bytes"],
        "blobs": 2,
        "blob_bytes": theirs["bytes"] + gone["bytes"],
        "orphan_blobs": 1,
        "orphan_bytes": gone["bytes"],
        "thumbnails": 0,
        "thumbnail_bytes": 0,
    }
    human = admin("images", "stats", env=env)
    assert human.stdout.splitlines()[2].startswith("orphan blobs: 1 (")

    dry = admin("images", "gc", "--dry-run", env=env)
    assert dry.returncode == 0 and dry.stdout.startswith("images gc: would remove 1 orphan blobs (")
    assert app.services.store.exists(gone["sha256"])

    done = admin("images", "gc", env=env)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("images gc: removed 1 orphan blobs (")
    assert "images gc: 100%" in done.stderr and "1/1" in done.stderr  # the bar
    assert not app.services.store.exists(gone["sha256"]) and app.services.store.exists(theirs["sha256"])
    assert (await fetch(api, theirs["url"])).code == 200
    again = admin("images", "gc", "--json", env=env)
    assert json.loads(again.stdout) == {"orphan_blobs": 0, "removed": 0, "bytes": 0, "failed": []}


@gen_test
async def test_images_gc_names_a_blob_it_cannot_remove_keeps_its_row_and_exits_1(api, user, settings, app):
    stuck, removable = await uploaded(api, user.token, png((40, 30))), await uploaded(api, user.token, jpeg((30, 20)))
    app.services.db.run_sync(lambda s: s.execute(delete(Image)))
    path = Path(settings.media_root) / object_name(stuck["sha256"])
    path.unlink()
    (path / "in-the-way").mkdir(parents=True)  # a folder where the file was: unlink fails

    done = admin("images", "gc", "--quiet", env=env_of(settings))

    assert done.returncode == 1
    assert done.stderr == f"images gc: {stuck['sha256']}: Is a directory: {path}\n"
    assert done.stdout.startswith("images gc: removed 1 orphan blobs (")
    assert "; 1 could not be removed (named above): run it again once fixed" in done.stdout
    assert not app.services.store.exists(removable["sha256"])
    remaining = json.loads(admin("images", "stats", "--json", env=env_of(settings)).stdout)
    assert (remaining["blobs"], remaining["orphan_blobs"]) == (1, 1)


@pytest.mark.usefixtures("storage")
@gen_test
async def test_images_gc_refuses_a_store_of_another_deployment(api, user, settings, app):
    image = await uploaded(api, user.token, png((40, 30)))
    app.services.db.run_sync(lambda s: s.execute(delete(Image)))
    app.services.store.claim_identity("another-deployment")  # the store of another database

    done = admin("images", "gc", env=env_of(settings))

    assert done.returncode == 2
    assert done.stderr.startswith("images gc: ") and done.stderr.count("\n") == 1
    assert app.services.store.exists(image["sha256"])


def test_images_gc_with_a_store_that_does_not_answer_exits_5(database_url, tmp_path):
    # A blob no image uses, so that there is work for the store.
    engine = make_test_engine(database_url)
    with engine.begin() as conn:
        conn.execute(ImageBlob.__table__.insert().values(sha256="ab" * 32, refs=0, created_at=utcnow(), bytes=1))
    engine.dispose()
    env = {
        "DEMO_DATABASE_URL": database_url,
        "DEMO_MEDIA_ROOT": str(tmp_path),
        "DEMO_STORAGE": "s3://demo-test/x",
        "DEMO_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s" * 40,
    }
    done = admin("images", "gc", env=env)
    assert done.returncode == 5, done.stderr
    assert done.stderr.startswith("images gc: the store s3://demo-test/x does not answer (")
    assert done.stderr.count("\n") == 1


def test_images_stats_with_a_database_that_does_not_answer_exits_3():
    done = admin("images", "stats", env={"DEMO_DATABASE_URL": "mysql+mysqldb://root:pw-secret@127.0.0.1:9/x"})
    assert done.returncode == 3 and done.stderr.startswith("images stats: database mysql+mysqldb://root:***@")
    assert "pw-secret" not in done.stderr and done.stderr.count("\n") == 1
