"""GET /users/me/export: the zip of one's data (every original image, then profile.json), on both
databases and both stores; streamed in bounded memory; limited per user, also under parallel requests."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import os
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from demo.common.accounts.export import CHUNK, EXPORTS_PER_HOUR
from demo.common.images.storage import object_name
from demo.models import Image, ImageBlob, User
from tests.common.images.support import fetch, jpeg, png, put_object, uploaded
from tests.helpers import Response

gen_test = pytest.mark.gen_test(timeout=120)


async def export(api, token: str) -> Response:
    return await api.get("/users/me/export", token=token)


def unzip(body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """profile.json and the other files of an export."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None  # every CRC checks out
        files = {name: archive.read(name) for name in archive.namelist()}
    return json.loads(files.pop("profile.json")), files


@pytest.mark.usefixtures("storage")
@gen_test
async def test_the_zip_holds_every_original_and_the_profile_as_the_api_shows_them(api, user):
    originals = {}
    for data in (jpeg((320, 240)), png((64, 48)), jpeg((200, 100))):
        image = await uploaded(api, user.token, data)
        served = await fetch(api, image["url"])
        assert served.code == 200
        originals[image["id"]] = (image, served.body)
    await api.get("/users/me", token=user.token)  # a use of the session: last_used_at as the list shows it

    answer = await export(api, user.token)

    assert answer.code == 200, answer.body
    assert answer.header("Content-Type") == "application/zip"
    assert answer.header("Cache-Control") == "no-store"
    assert answer.header("Content-Disposition").startswith('attachment; filename="demo-export-')
    profile, files = unzip(answer.body)
    extensions = {"jpeg": "jpg", "png": "png"}
    assert files == {f"images/{i}.{extensions[image['format']]}": body for i, (image, body) in originals.items()}
    me = (await api.get("/users/me", token=user.token)).json["user"]
    assert profile["user"] == {
        "id": me["id"],
        "phone": "+8618866668888",
        "created_at": me["created_at"],
        "last_login_at": me["last_login_at"],
        "h5_visit_count": 0,
        "h5_last_visit_at": None,
        "deletion_final_at": None,
    }
    listed = (await api.get("/users/me/sessions", token=user.token)).json["sessions"]
    assert profile["sessions"] == listed and [s["current"] for s in listed] == [True]
    assert [image["id"] for image in profile["images"]] == list(originals)
    for entry in profile["images"]:
        image, body = originals[entry["id"]]
        assert entry["file"] in files and hashlib.sha256(body).hexdigest() == entry["sha256"]
        assert {k: entry[k] for k in ("width", "height", "format", "bytes", "created_at")} == {
            k: image[k] for k in ("width", "height", "format", "bytes", "created_at")
        }


@gen_test
async def test_an_account_without_images_exports_its_profile_alone(api, user):
    answer = await export(api, user.token)
    assert answer.code == 200
    profile, files = unzip(answer.body)
    assert files == {} and profile["images"] == [] and profile["user"]["id"] == user.id


@gen_test
async def test_without_a_token_it_is_401_and_nothing_is_counted(api, user):
    answer = await api.get("/users/me/export")
    assert answer.code == 401 and answer.error == "unauthorized"
    for _ in range(EXPORTS_PER_HOUR):
        assert (await export(api, user.token)).code == 200


@gen_test
async def test_the_hourly_limit_holds_under_parallel_requests(api, user, clock):
    answers = await asyncio.gather(*(export(api, user.token) for _ in range(EXPORTS_PER_HOUR + 4)))

    assert sorted(a.code for a in answers) == [200] * EXPORTS_PER_HOUR + [429] * 4
    refused = [a for a in answers if a.code == 429]
    assert all(a.error == "rate_limited" and 1 <= int(a.header("Retry-After")) <= 3600 for a in refused)
    clock.advance(3600)  # the next window
    assert (await export(api, user.token)).code == 200


@pytest.mark.usefixtures("storage")
@gen_test
async def test_an_image_the_store_lost_is_left_out_and_marked_in_the_profile(api, user, app):
    kept = await uploaded(api, user.token, jpeg((120, 90)))
    lost = await uploaded(api, user.token, png((50, 40)))
    app.services.store.delete(lost["sha256"], [])

    answer = await export(api, user.token)

    assert answer.code == 200
    profile, files = unzip(answer.body)
    assert list(files) == [f"images/{kept['id']}.jpg"]
    assert {i["id"]: i["file"] for i in profile["images"]} == {kept["id"]: f"images/{kept['id']}.jpg", lost["id"]: None}


def _add_blobs(app, user, count: int, size: int) -> dict[str, bytes]:
    """``count`` random originals of ``size`` bytes in the app's store, as images of ``user`` (made
    behind the API's back: no upload of that size passes its decode, and the export does not decode);
    their sha256 -> their digest."""
    digests = {}
    now = dt.datetime(2026, 11, 29, 12)
    with app.services.db.engine.begin() as conn:
        owner = conn.execute(select(User.id).where(User.phone == user.phone)).scalar_one()
    for n in range(count):
        data = os.urandom(size)
        sha256 = hashlib.sha256(data).hexdigest()
        put_object(app, sha256, data)
        digests[sha256] = hashlib.sha256(data).digest()
        with app.services.db.engine.begin() as conn:
            conn.execute(ImageBlob.__table__.insert().values(sha256=sha256, refs=1, created_at=now, bytes=size))
            conn.execute(
                Image.__table__.insert().values(
                    id=f"big-image-{n:07d}-xxxx",
                    owner_id=owner,
                    sha256=sha256,
                    format="jpeg",
                    width=4000,
                    height=3000,
                    bytes=size,
                    created_at=now,
                )
            )
    return digests


@pytest.mark.usefixtures("storage")
@gen_test(timeout=300)
async def test_images_far_larger_than_memory_allows_stream_through_in_bounded_memory(api, user, app, tmp_path):
    count, size = 4, 12 * 1024 * 1024
    digests = _add_blobs(app, user, count, size)
    out = tmp_path / "export.zip"
    client = AsyncHTTPClient(force_instance=True)
    tracemalloc.start()
    try:
        with out.open("wb") as file:
            tracemalloc.reset_peak()
            await client.fetch(
                f"{api.base_url}/users/me/export",
                headers={"Authorization": f"Bearer {user.token}"},
                streaming_callback=lambda piece: None if file.write(piece) else None,  # a piece at a time
                request_timeout=240,
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        client.close()

    # The server, the client and the test share this process: all of it held at once stays under a
    # small multiple of a piece, while the zip is 48 MiB.
    assert out.stat().st_size > count * size
    assert peak < 16 * CHUNK, f"peak {peak} bytes while exporting {count * size}"
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        assert len(names) == count + 1 and names[-1] == "profile.json"
        for info in archive.infolist()[:-1]:
            digest = hashlib.sha256()
            with archive.open(info) as entry:  # CRC checked as it is read
                while piece := entry.read(1 << 20):
                    digest.update(piece)
            assert digest.digest() in digests.values()


@gen_test(timeout=120)
async def test_a_store_failing_after_the_first_pieces_cuts_the_connection(api, user, app):
    """The headers are gone by then: only a cut connection says the zip is incomplete."""
    _add_blobs(app, user, 2, 4 * CHUNK)
    # The second image's file turns into a folder: reading it fails (not as a lost object, which is
    # left out), after the first image went out.
    with app.services.db.engine.begin() as conn:
        shas = conn.execute(select(Image.sha256).order_by(Image.pk)).scalars().all()
    path = Path(app.services.store.root) / object_name(shas[1])
    path.unlink()
    path.mkdir()

    client = AsyncHTTPClient(force_instance=True)
    received = bytearray()
    try:
        with pytest.raises((HTTPClientError, OSError)):
            await client.fetch(
                f"{api.base_url}/users/me/export",
                headers={"Authorization": f"Bearer {user.token}"},
                streaming_callback=received.extend,
                request_timeout=60,
            )
    finally:
        client.close()
    assert len(received) >= 4 * CHUNK  # the first image went out whole
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(bytes(received)))
