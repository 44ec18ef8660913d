"""Mixed app traffic from the client host, every request recorded; the failure windows; the timeline.

Each worker thread is one phone: it registers (the SMS code read from the app hosts' outbox files:
whichever process took the request texts it), then loops over logins with an H5 visit, uploads (some
of the same bytes again), fetches of its own images and thumbnails, and deletes, mostly through the
front and now and then straight to an app host. Every request is a ``Record``: when, to which host,
what for, and what came back (a status, or the connection error).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import random
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, ImageDraw

GRACE = 2.0  # seconds after a window's end during which requests that were in flight may still fail
# A thumbnail of an image whose bytes had been deleted (the blob and its thumbnails went with the last
# image on them) and then uploaded again: counted apart in the timeline, as the processes that knew the
# old image's thumbnail must make the new image's again, not send nginx to the removed object.
REUPLOADED = "thumbnail_of_reupload"


@dataclass
class Record:
    start: float
    end: float
    target: str
    kind: str
    outcome: str  # "200", "503", ... or "conn:<error>"


@dataclass
class Window:
    name: str
    start: float
    end: float = 0.0
    host: str = ""  # the app host killed in it: connection errors to it are expected there
    database: bool = False  # whether the failure was one of the database's
    notes: list[str] = field(default_factory=list)


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class Targets:
    """Where requests go: ``front`` (HTTPS, the shipped nginx) or an app host (plain HTTP, port 8000)."""

    def __init__(self, front: str, tls: ssl.SSLContext, apps: dict[str, str], server_name: str) -> None:
        self.front, self.tls, self.apps, self.server_name = front, tls, apps, server_name

    def connection(self, target: str, timeout: float) -> http.client.HTTPConnection:
        if target == "front":
            sock = socket.create_connection((self.front, 443), timeout)
            connection = http.client.HTTPSConnection(self.server_name, 443, timeout=timeout, context=self.tls)
            connection.sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)
            return connection
        return http.client.HTTPConnection(self.apps[target], 8000, timeout=timeout)


class Traffic:
    def __init__(self, targets: Targets, outboxes: list[Path], seed: int) -> None:
        self.targets = targets
        self.outboxes = outboxes
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.registered: dict[str, str] = {}  # phone -> password, acknowledged (201)
        self.uploads: dict[str, dict[str, Any]] = {}  # image id -> image object, acknowledged (201)
        self.deleted: set[str] = set()  # acknowledged deletes (204)
        self.uncertain: set[str] = set()  # deletes that got no clear answer: either way is right
        self.codes_missing = 0
        # Images whose bytes this deployment had deleted (the blob and its thumbnails went) before they
        # were uploaded again: see REUPLOADED above.
        self.reuploaded: set[str] = set()
        self.random = random.Random(seed)
        self.phone_base = 18800000000 + self.random.randrange(0, 90_000_000)
        self.phones = iter(range(self.phone_base, self.phone_base + 10_000_000))
        self.started = time.monotonic()

    # -- requests -----------------------------------------------------------------------------------

    def request(
        self,
        target: str,
        kind: str,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> Answer | None:
        """One request on a new connection, recorded; None when the connection failed."""
        if path.startswith(("http://", "https://")):
            parts = urlsplit(path)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = dict(headers or {})
        if target == "front":
            headers["Host"] = self.targets.server_name
        began = time.monotonic()
        try:
            connection = self.targets.connection(target, timeout)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                answer = Answer(response.status, response.headers, response.read())
            finally:
                connection.close()
        except (OSError, http.client.HTTPException) as error:
            self.record(Record(began, time.monotonic(), target, kind, f"conn:{type(error).__name__}"))
            return None
        self.record(Record(began, time.monotonic(), target, kind, str(answer.status)))
        return answer

    def record(self, entry: Record) -> None:
        with self.lock:
            self.records.append(entry)

    def post_json(self, target: str, kind: str, path: str, payload: Any, token: str | None = None) -> Answer | None:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.request(target, kind, "POST", path, body=json.dumps(payload).encode(), headers=headers)

    # -- the app's stories --------------------------------------------------------------------------

    def sms_code(self, phone: str, timeout: float = 15) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for outbox in self.outboxes:
                if outbox.exists():
                    for line in outbox.read_text().splitlines():
                        if line.strip():
                            text = json.loads(line)
                            if text["phone"] == phone and text["code"]:
                                return str(text["code"])
            time.sleep(0.2)
        return None

    def register(self, target: str, rng: random.Random) -> tuple[str, str] | None:
        with self.lock:
            phone = str(next(self.phones))
        password = f"pw-{uuid.uuid4().hex[:12]}"
        sent = self.post_json(target, "code", "/users/code", {"phone": phone})
        if sent is None or sent.status != 200:
            return None
        code = self.sms_code("+86" + phone)
        if code is None:
            with self.lock:
                self.codes_missing += 1
            return None
        made = self.post_json(target, "regist", "/users/regist", {"phone": phone, "password": password, "code": code})
        if made is None or made.status != 201:
            return None
        with self.lock:
            self.registered[phone] = password
        return phone, str(made.json()["token"])

    def login(self, target: str, phone: str, password: str, kind: str = "login") -> dict[str, Any] | None:
        answer = self.post_json(target, kind, "/users/login", {"phone": phone, "password": password})
        if answer is None or answer.status != 200:
            return None
        session: dict[str, Any] = answer.json()
        return session

    def h5_visit(self, target: str, session: dict[str, Any]) -> None:
        """What the app's WebView does: open the ticket URL, keep the cookie, follow to the page."""
        opened = self.request(target, "h5_ticket", "GET", session["h5_url"])
        if opened is None or opened.status != 302:
            return
        cookie = (opened.headers.get("Set-Cookie") or "").split(";")[0]
        page = self.request(target, "h5_home", "GET", "/h5/home", headers={"Cookie": cookie})
        if page is not None and page.status == 200:
            assert b"<html" in page.body.lower(), page.body[:200]

    def upload(self, target: str, token: str, picture: bytes) -> dict[str, Any] | None:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + picture
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {token}"}
        answer = self.request(target, "upload", "POST", "/images", body=body, headers=headers)
        if answer is None or answer.status != 201:
            return None
        image: dict[str, Any] = answer.json()["image"]
        with self.lock:
            self.uploads[image["id"]] = image
        return image

    def fetch(self, target: str, url: str, kind: str) -> Answer | None:
        return self.request(target, kind, "GET", url)

    def delete(self, target: str, token: str, image_id: str) -> None:
        answer = self.request(
            target, "delete", "DELETE", f"/images/{image_id}", headers={"Authorization": f"Bearer {token}"}
        )
        with self.lock:
            if answer is not None and answer.status == 204:
                self.deleted.add(image_id)
            elif answer is None or answer.status >= 500 or answer.status == 404:
                # 404 for one's own image: a first try did it on a host killed before it answered, and
                # nginx tried the DELETE (idempotent) again on the other host (see unexplained)
                self.uncertain.add(image_id)

    # -- one client -------------------------------------------------------------------------------------

    def worker(self, number: int) -> None:
        rng = random.Random(self.random.random() + number)
        mine: list[dict[str, Any]] = []
        pictures: list[bytes] = []
        gone: set[str] = set()  # blobs (sha256) of images this worker deleted
        me: tuple[str, str] | None = None
        while me is None and not self.stop.is_set():
            me = self.register("front", rng)
        while not self.stop.is_set():
            assert me is not None
            phone, token = me
            target = "front" if rng.random() < 0.8 else rng.choice(list(self.targets.apps))
            roll = rng.random()
            if roll < 0.12:
                self.register(target, rng)
            elif roll < 0.30:
                session = self.login(target, phone, self.registered[phone])
                if session is not None:
                    token = session["token"]
                    me = (phone, token)
                    self.h5_visit(target, session)
            elif roll < 0.55:
                if pictures and rng.random() < 0.25:
                    picture = rng.choice(pictures)  # the same bytes again: one blob, two images
                else:
                    picture = make_picture(rng)
                    pictures.append(picture)
                image = self.upload(target, token, picture)
                if image is not None:
                    mine.append(image)
                    if image["sha256"] in gone:
                        with self.lock:
                            self.reuploaded.add(image["id"])
            elif roll < 0.93 and mine:
                image = rng.choice(mine)
                answer = self.fetch(target, image["url"], "image")
                if answer is not None and answer.status == 200:
                    assert hashlib.sha256(answer.body).hexdigest() == image["sha256"], image["id"]
                kind = REUPLOADED if image["id"] in self.reuploaded else "thumbnail"
                self.fetch(target, image["thumbnails"][rng.choice(["160", "320"])], kind)
            elif mine:
                image = mine.pop(rng.randrange(len(mine)))
                gone.add(image["sha256"])
                self.delete(target, token, image["id"])

    # -- the timeline -------------------------------------------------------------------------------------

    def unexplained(self, windows: list[Window]) -> list[Record]:
        """The requests whose outcome no failure window explains. Explained: a 503 of a request in
        flight during a window (+ GRACE); a connection error to the app host killed in it. Anything else
        fails the test: any 4xx (a read on one node of what was just written on another would be one:
        the app reads causally on Galera), a request without an answer within the client's 30 s, a 5xx
        other than 503, a 503 outside the windows, a connection error to a host nobody killed. One 4xx
        is explained: a DELETE through the front answered 404 while an app host was killed."""
        unexplained = []
        for entry in self.records:
            code = entry.outcome
            if code.startswith(("2", "3")):
                continue
            inside = [w for w in windows if entry.end >= w.start and entry.start <= w.end + GRACE]
            if code == "503" and inside:
                continue
            if code.startswith("conn:") and any(w.host == entry.target for w in inside):
                continue
            # nginx retries an idempotent request whose host died (proxy_next_upstream): a DELETE that
            # the killed host had done finds nothing on the other one. HTTP allows it (the image is
            # gone, as asked); the client's DELETE was in flight on the killed host.
            if code == "404" and entry.kind == "delete" and entry.target == "front" and any(w.host for w in inside):
                continue
            unexplained.append(entry)
        return unexplained

    def timeline(self, windows: list[Window]) -> str:
        t0 = self.started
        lines = ["failure timeline (seconds from the start of the traffic):"]
        for window in windows:
            inside = [r for r in self.records if r.end >= window.start and r.start <= window.end + GRACE]
            seen = Counter(f"{r.target} {r.outcome}" for r in inside)
            errors = {k: v for k, v in sorted(seen.items()) if not k.split()[1].startswith(("2", "3", "4"))}
            ok = sum(v for k, v in seen.items() if k.split()[1].startswith(("2", "3", "4")))
            lines.append(
                f"  {window.start - t0:6.1f} .. {window.end - t0:6.1f}  {window.name}: {len(inside)} requests, "
                f"{ok} answered 2xx-4xx; errors: {errors or 'none'}"
            )
            lines.extend(f"      {note}" for note in window.notes)
        outside = [r for r in self.records if not any(r.end >= w.start and r.start <= w.end + GRACE for w in windows)]
        seen = Counter(r.outcome for r in outside)
        lines.append(f"  outside the windows: {len(outside)} requests, outcomes {dict(sorted(seen.items()))}")
        stale = Counter(r.outcome for r in self.records if r.kind == REUPLOADED)
        lines.append(
            f"  thumbnails of {len(self.reuploaded)} images uploaded again after their bytes were deleted: "
            f"{dict(stale)}"
        )
        total = Counter(r.kind for r in self.records)
        lines.append(f"  all: {len(self.records)} requests over {self.duration():.0f} s: {dict(sorted(total.items()))}")
        lines.append(
            f"  acknowledged: {len(self.registered)} registrations, {len(self.uploads)} uploads, "
            f"{len(self.deleted)} deletes ({len(self.uncertain)} deletes without an answer); "
            f"codes that never arrived: {self.codes_missing}"
        )
        return "\n".join(lines)

    def save(self, path: Path, windows: list[Window]) -> None:
        """Every request (seconds from the start), then the windows: for a closer look after a run."""
        t0 = self.started
        with path.open("w") as out:
            for r in sorted(self.records, key=lambda r: r.start):
                out.write(
                    json.dumps(
                        {
                            "start": round(r.start - t0, 3),
                            "end": round(r.end - t0, 3),
                            "target": r.target,
                            "kind": r.kind,
                            "outcome": r.outcome,
                        }
                    )
                    + "\n"
                )
            for w in windows:
                out.write(
                    json.dumps({"window": w.name, "start": round(w.start - t0, 3), "end": round(w.end - t0, 3)}) + "\n"
                )

    def duration(self) -> float:
        return max((r.end for r in self.records), default=self.started) - self.started


def make_picture(rng: random.Random) -> bytes:
    """A PNG nobody uploaded before (random rectangles), wide enough for the 160 and 320 thumbnails."""
    image = Image.new("RGB", (400, 300), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(380), rng.randrange(280)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.rectangle((x, y, x + rng.randrange(10, 200), y + rng.randrange(10, 150)), fill=colour)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
