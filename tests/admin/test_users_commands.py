"""``python -m demo.admin users ...`` as an operator runs it (a real process, its exit status and output)
against the app's own database, SQLite and MariaDB, while the app serves: what each command changes
is what the API then answers."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import zipfile
from typing import Any

import pytest
from sqlalchemy import func, select, text

from demo.models import User
from tests.admin.test_copy_media import admin as run_admin
from tests.common.images.support import jpeg, png, storage_env, uploaded
from tests.helpers import make_test_engine, sent_phone
from tests.views.test_account_deletion_views import code_for

gen_test = pytest.mark.gen_test(timeout=120)
PHONE, E164, MASKED, PASSWORD = "18866668888", "+8618866668888", "+86 188****8888", "demo123456"


async def admin(settings, *args: str, env: dict[str, str] | None = None):
    """The command on the app's database and store (its settings as DEMO_* variables), off the loop:
    the app keeps serving meanwhile."""
    environ = {
        "DEMO_DATABASE_URL": settings.database_url,
        "DEMO_MEDIA_ROOT": settings.media_root,
        **storage_env({"storage": settings.storage, "s3_endpoint": settings.s3_endpoint}),
        **(env or {}),
    }
    return await asyncio.get_running_loop().run_in_executor(None, lambda: run_admin(*args, env=environ))


async def login(api, password: str = PASSWORD):
    return await api.post("/users/login", {"phone": PHONE, "password": password})


def one_line(done) -> str:
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


@gen_test
async def test_find_shows_the_account_with_its_phone_masked(api, user, settings):
    await uploaded(api, user.token, jpeg((80, 60)))

    done = await admin(settings, "users", "find", PHONE)

    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.startswith(f"user {user.id}  {MASKED}\n")
    assert "status:            active" in done.stdout and "images:            1 (" in done.stdout
    assert "live sessions:     1" in done.stdout
    assert E164 not in done.stdout and PHONE not in done.stdout
    as_json = await admin(settings, "users", "find", E164, "--json")
    assert as_json.returncode == 0
    found = json.loads(as_json.stdout)["user"]
    assert found["id"] == user.id and found["phone"] == MASKED and found["status"] == "active"
    assert (found["images"], found["live_sessions"], found["h5_visit_count"]) == (1, 1, 0)
    assert found["image_bytes"] > 0 and found["disabled_at"] is None


@gen_test
async def test_find_lists_the_accounts_frozen_off_the_number_after_its_holder(api, user, settings, clock, outbox):
    clock.advance(366 * 24 * 3600)  # dormant: a reset code for the number gives it a fresh account
    code = await code_for(api, outbox, clock, "reset")
    reset = await api.post("/users/password/reset", {"phone": PHONE, "code": code, "password": "new holder 4242"})
    assert reset.code == 204, reset.body

    done = await admin(settings, "users", "find", PHONE, "--json")

    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["user"]["id"] != user.id and found["user"]["status"] == "active"
    [frozen] = found["frozen"]
    assert (frozen["id"], frozen["phone"]) == (user.id, MASKED) and frozen["status"].startswith("frozen")
    shown = await admin(settings, "users", "show", user.id)
    assert shown.returncode == 0 and f"user {user.id}  {MASKED}" in shown.stdout, shown.stderr


@gen_test
async def test_show_names_the_account_by_its_public_id(api, user, settings):
    done = await admin(settings, "users", "show", user.id, "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)["user"]
    me = (await api.get("/users/me", token=user.token)).json["user"]
    assert (shown["id"], shown["created_at"], shown["last_login_at"]) == (
        me["id"],
        me["created_at"],
        me["last_login_at"],
    )


@gen_test
async def test_disable_ends_every_session_and_refuses_the_login_until_enable(api, user, settings):
    second = (await login(api)).json["token"]

    done = await admin(settings, "users", "disable", user.id)

    assert (done.returncode, done.stdout) == (0, f"user {user.id} disabled; 2 sessions ended\n"), done.stderr
    for token in (user.token, second):
        assert (await api.get("/users/me", token=token)).code == 401
    refused = await login(api)
    assert (refused.code, refused.error) == (403, "account_disabled")
    wrong = await login(api, "not the password")  # a stranger learns nothing: the 401 of any account
    assert (wrong.code, wrong.error) == (401, "invalid_credentials")
    shown = json.loads((await admin(settings, "users", "show", user.id, "--json")).stdout)["user"]
    assert shown["status"] == "disabled" and shown["disabled_at"] and shown["live_sessions"] == 0
    again = await admin(settings, "users", "disable", user.id, "--json")
    assert json.loads(again.stdout) == {"id": user.id, "disabled": True, "changed": False, "sessions_ended": 0}

    enabled = await admin(settings, "users", "enable", user.id)
    assert (enabled.returncode, enabled.stdout) == (0, f"user {user.id} enabled\n")
    assert (await login(api)).code == 200


@pytest.mark.settings(sms_login=True)
@gen_test
async def test_a_disabled_account_cannot_log_in_with_an_sms_code_either(api, user, settings, outbox, clock):
    assert (await admin(settings, "users", "disable", user.id)).returncode == 0
    clock.advance(settings.sms_resend_after + 1)  # the registration's code was the last one
    assert (await api.post("/users/code", {"phone": PHONE, "purpose": "login"})).code == 200
    code = await outbox.code(sent_phone(PHONE))
    refused = await api.post("/users/login", {"phone": PHONE, "code": code})
    assert (refused.code, refused.error) == (403, "account_disabled")


@gen_test
async def test_end_sessions_signs_out_every_device(api, user, settings):
    await login(api)
    done = await admin(settings, "users", "end-sessions", user.id, "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == {"id": user.id, "sessions_ended": 2}
    assert (await api.get("/users/me", token=user.token)).code == 401
    assert (await login(api)).code == 200  # not disabled: the owner signs in again


@gen_test
async def test_delete_takes_the_path_of_delete_users_me_and_a_login_in_the_grace_period_undoes_it(
    api, user, settings, clock
):
    done = await admin(settings, "users", "delete", user.id, "--json")

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["purged"] is False and answer["sessions_ended"] == 1
    final_at = dt.datetime.fromisoformat(answer["final_at"].removesuffix("Z"))
    grace = dt.timedelta(seconds=settings.account_deletion_grace)
    assert abs(final_at - (clock.now() + grace)) < dt.timedelta(minutes=5)
    assert (await api.get("/users/me", token=user.token)).code == 401
    back = await login(api)
    assert back.code == 200 and back.json.get("deletion_cancelled") is True


@pytest.mark.usefixtures("storage")
@gen_test
async def test_delete_now_purges_the_account_at_once_and_images_gc_removes_its_blobs(api, user, settings, app, outbox):
    image = await uploaded(api, user.token, png((40, 30)))

    done = await admin(settings, "users", "delete", user.id, "--now")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"user {user.id} deleted and purged; 1 sessions ended")
    assert app.services.db.run_sync(lambda s: s.scalar(select(func.count()).select_from(User))) == 0
    assert app.services.store.exists(image["sha256"])  # left to the blob sweep
    gc = await admin(settings, "images", "gc", "--quiet")
    assert (gc.returncode, gc.stdout) == (0, "images gc: removed 1 orphan blobs (" + gc.stdout.split("(", 1)[1])
    assert not app.services.store.exists(image["sha256"])
    assert (await api.register(outbox)).code == 201  # the phone registers anew
    assert (await admin(settings, "users", "show", user.id)).returncode == 4


@pytest.mark.usefixtures("storage")
@gen_test
async def test_export_writes_the_zip_the_api_makes(api, user, settings, tmp_path):
    for data in (jpeg((160, 120)), png((30, 20))):
        await uploaded(api, user.token, data)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "export.zip"

    done = await admin(settings, "users", "export", user.id, f"--out={out}")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"user {user.id}: 2 images and profile.json, ") and done.stdout.endswith(
        f" -> {out}\n"
    )
    assert "users export: 100%" in done.stderr  # the bar
    assert [p.name for p in out.parent.iterdir()] == ["export.zip"]  # no partial file left
    by_api = (await api.get("/users/me/export", token=user.token)).body
    mine, theirs = _contents(out.read_bytes()), _contents(by_api)
    assert mine["files"] == theirs["files"] and len(mine["files"]) == 2
    for profile in (mine["profile"], theirs["profile"]):
        profile.pop("exported_at")
        for session in profile["sessions"]:
            session.pop("current")
            session.pop("last_used_at")
    assert mine["profile"] == theirs["profile"]


def _contents(body: bytes) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    return {"profile": json.loads(files.pop("profile.json")), "files": files}


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        # "x" first: a word starting with "-" that is not an id's shape is an option to argparse
        (["users", "show", "x{id}"], 2, "users show: 'x{id}': not a user id (22 letters, digits, - or _)\n"),
        (["users", "show", "A" * 22], 4, "users show: no user " + "A" * 22 + "\n"),
        (["users", "disable", "A" * 22], 4, "users disable: no user " + "A" * 22 + "\n"),
        (["users", "delete", "A" * 22, "--now"], 4, "users delete: no user " + "A" * 22 + "\n"),
        (["users", "end-sessions", "A" * 22], 4, "users end-sessions: no user " + "A" * 22 + "\n"),
        (["users", "find", "12345"], 2, "users find: '12345': not a mobile number (default_region CN)\n"),
        (["users", "find", "18800000001"], 4, "users find: no user with phone +86 188****0001\n"),
        (["users", "show"], 2, "python -m demo.admin users show: the following arguments are required: ID"),
        (["users", "show", "{id}", "--frob"], 2, "users show: --frob: Unrecognized command line option"),
        (["users", "show", "{id}", "extra"], 2, "users show: unexpected argument 'extra'\n"),
        (["users", "wipe", "{id}"], 2, "python -m demo.admin users: argument COMMAND: invalid choice: 'wipe'"),
        (
            ["users", "export", "{id}"],
            2,
            "python -m demo.admin users export: the following arguments are required: --out",
        ),
        (["users", "export", "{id}", "--out={tmp}"], 2, "users export: --out {tmp}: exists already"),
        (["users", "export", "{id}", "--out={tmp}/no/x.zip"], 2, "users export: --out {tmp}/no/x.zip: no such folder"),
    ],
    ids=[
        "bad-id",
        "unknown-id",
        "disable-unknown",
        "delete-unknown",
        "end-unknown",
        "bad-phone",
        "unknown-phone",
        "no-id",
        "bad-option",
        "extra-argument",
        "bad-command",
        "no-out",
        "out-exists",
        "out-folder",
    ],
)
@gen_test
async def test_bad_input_is_one_line_and_its_exit_status(api, user, settings, tmp_path, args, status, says):
    names = {"id": user.id, "tmp": tmp_path}
    done = await admin(settings, *(a.format(**names) for a in args))
    assert done.returncode == status
    assert one_line(done).startswith(says.format(**names)), done.stderr
    assert done.stdout == ""
    assert (await api.get("/users/me", token=user.token)).code == 200  # nothing changed


@gen_test
async def test_a_database_that_does_not_answer_exits_3_with_its_password_masked(settings, user):
    done = await admin(
        settings, "users", "show", user.id, env={"DEMO_DATABASE_URL": "mysql+mysqldb://root:pw-secret@127.0.0.1:9/x"}
    )
    assert done.returncode == 3
    assert one_line(done).startswith("users show: database mysql+mysqldb://root:***@127.0.0.1:9/x: ")
    assert "pw-secret" not in done.stderr


def test_help_lists_the_commands_and_the_exit_statuses():
    done = run_admin("users", "--help")
    assert done.returncode == 0
    for command in ("find", "show", "disable", "enable", "delete", "end-sessions", "export"):
        assert command in done.stdout
    statuses = done.stdout.split("exit statuses:")[1]
    assert [line.split()[0] for line in statuses.splitlines() if line[2:4].strip()] == [
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
        "130",
    ]


def test_a_database_without_this_release_s_schema_is_one_line_and_status_2(tmp_path):
    done = run_admin(
        "users", "show", "Xq3vC0nT9bLmA2rE8sKd1w", env={"DEMO_DATABASE_URL": f"sqlite:///{tmp_path}/new.db"}
    )
    assert done.returncode == 2 and "has schema none, this release needs" in one_line(done)


@gen_test
async def test_an_id_that_begins_with_a_dash_is_an_id_not_an_option(api, user, settings):
    dashed = "-" + user.id[1:]
    engine = make_test_engine(settings.database_url)
    with engine.begin() as conn:
        rename = text("UPDATE users SET public_id = :dashed WHERE public_id = :id")
        conn.execute(rename, {"dashed": dashed, "id": user.id})
    engine.dispose()
    done = await admin(settings, "users", "show", dashed, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["user"]["id"] == dashed
