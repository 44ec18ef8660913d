#!/usr/bin/env python3
"""The benchmark harness: ``make bench`` (full) or ``make bench-smoke`` (seconds). See bench/README.md.

One run measures the ceilings of this machine (Tornado hello world, nginx serving a static file,
one argon2 hash, one Pillow decode + re-encode) and then demo on MariaDB - one process directly,
two processes behind the shipped nginx config, one and two ``--processes=2`` hosts behind it - with
wrk on loopback, and compares each scenario with its ceiling (or the one-host run) from the same
run. Prints one markdown table, writes every raw number as JSON. Exit status: 2 when the harness
itself breaks (a server does not start, wrk is missing); with ``--check``, 1 when a target is
missed; otherwise 0 (the table is the product).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:  # `python bench/run.py`: make `bench` and `demo` importable
    sys.path.insert(0, str(ROOT))

from bench import images as bench_images
from bench import wrk
from bench.stack import (
    MYSQL_SERVER,
    BenchDatabase,
    CpuMeter,
    DemoServer,
    HarnessError,
    HelloServer,
    Server,
    cpu_seconds,
    forked_workers,
    free_port_on,
    proc_status_kib,
    wait_idle,
)
from tests.helpers import S3_CREDENTIALS, HttpClient, Nginx, SeaweedFS, mysql_unreachable_reason, wait_until
from tests.helpers import reset_peak_memory as reset_peak_rss

MIB = 1024 * 1024
CORES = os.cpu_count() or 1
PASSWORD = "bench-password-8472"
SMS_CODE = "246810"
HUGE = str(10**12)
PY_SPY = Path(sys.executable).parent / "py-spy"
S3_PREFIX = "bench"  # the bench's objects in SeaweedFS's bucket: s3://<bucket>/bench/...

LOCAL_MEASURES = (
    "healthz", "healthz_2proc", "image_direct", "thumbnail", "h5_home", "login", "upload", "loop_health",
    "memory", "memory_animated", "image_nginx", "h5_home_nginx", "login_nginx", "h5_home_lb_1host",
    "h5_home_lb_2hosts",
)  # fmt: skip
# The load balancer measures (issue 16, point 6): app "hosts" on loopback addresses of their own (all of
# 127.0.0.0/8 is on ``lo``), each ``--processes=2``, behind the shipped nginx config's upstream.
LB_MEASURES = ("h5_home_lb_1host", "h5_home_lb_2hosts")
LB_HOSTS = ("127.0.0.2", "127.0.0.3")
S3_MEASURES = ("image_direct_s3", "upload_s3", "memory_s3", "image_nginx_s3", "image_nginx_s3_cold")

# name -> (label, ceiling it is compared with)
MEASURES: dict[str, tuple[str, str | None]] = {
    "healthz": ("GET /healthz, 1 process", "hello"),
    "healthz_2proc": ("GET /healthz, --processes=2 on one port", None),  # compared with healthz: report()
    "image_direct": ("GET /images/{id}.jpg direct, 1 process", "hello"),
    "thumbnail": ("GET /images/{id}.jpg?w=320 (thumbnail) direct, 1 process", "hello"),
    "h5_home": ("GET /h5/home (cookie), 1 process", "hello"),
    "login": ("POST /users/login, 1 process", "argon2"),
    "upload": ("POST /images 1 MiB JPEG, 1 process", "pillow"),
    "loop_health": ("/healthz p99 while logins + uploads saturate, 1 process", None),
    "memory": ("RSS growth, {n} concurrent 8 MiB uploads, 1 process", None),
    "memory_animated": ("RSS growth, {n} concurrent animated GIF uploads, then their thumbnails, 1 process", None),
    "image_nginx": ("GET /images/{id}.jpg through nginx (warm), 2 processes", "nginx_static"),
    "h5_home_nginx": ("GET /h5/home through nginx, 2 processes", "hello"),
    "login_nginx": ("POST /users/login through nginx, 2 processes", "argon2"),
    # No ceiling: the one-host run is what the two-host run is compared with (report(), lb_table).
    "h5_home_lb_1host": ("GET /h5/home through nginx, 1 host x --processes=2", None),
    "h5_home_lb_2hosts": ("GET /h5/home through nginx, 2 hosts x --processes=2", None),
    # The object store (issue 15): the same image and upload with storage=s3://... on SeaweedFS.
    "image_direct_s3": ("GET /images/{id}.jpg direct, S3 store, memory cache off, 1 process", "hello"),
    "upload_s3": ("POST /images 1 MiB JPEG, S3 store, 1 process", "pillow"),
    "memory_s3": ("RSS growth, {n} concurrent 8 MiB uploads, S3 store, 1 process", None),
    "image_nginx_s3": ("GET /images/{id}.jpg through nginx (warm), S3 store, 2 processes", "nginx_static"),
    "image_nginx_s3_cold": (
        "GET /images/{id}.jpg through nginx, cache off (X-Accel-Redirect to S3), 2 processes",
        "s3_direct",
    ),
}
CEILINGS = {
    "hello": "Tornado hello world (framework)",
    "nginx_static": "nginx static file (HTTP)",
    "argon2": "argon2 hash (login)",
    "pillow": "Pillow decode + re-encode (upload)",
    "s3_direct": "S3 GET from SeaweedFS (presigned URL)",
}


@dataclass(frozen=True)
class Target:
    measure: str
    kind: str  # ratio | p99_ms | growth_mib
    bound: float
    text: str

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.bound if self.kind == "ratio" else value < self.bound


TARGETS = [
    Target("h5_home", "ratio", 0.25, ">= 25% of hello-world"),
    Target("image_nginx", "ratio", 0.30, ">= 30% of nginx static"),
    Target("image_direct", "ratio", 0.50, ">= 50% of hello-world"),
    Target("login", "ratio", 0.90, ">= 90% of argon2 ceiling"),
    Target("upload", "ratio", 0.70, ">= 70% of Pillow ceiling"),
    Target("loop_health", "p99_ms", 25.0, "p99 < 25 ms"),
    Target("memory", "growth_mib", 64.0, "< 64 MiB"),
    Target("memory_animated", "growth_mib", 112.0, "< 112 MiB"),  # bench/README.md, step 5
    Target("upload_s3", "ratio", 0.60, ">= 60% of Pillow ceiling"),
    Target("memory_s3", "growth_mib", 64.0, "< 64 MiB"),
    Target("image_nginx_s3", "ratio", 0.80, ">= 80% of nginx static"),
    Target("image_nginx_s3_cold", "ratio", 0.50, ">= 50% of S3 direct GET"),
]
TARGET_OF = {t.measure: t for t in TARGETS}


# -- small HTTP client for set-up and probes ---------------------------------------------------------


class Http(HttpClient):
    """tests/helpers.py's blocking client (a new connection per call, whole URLs accepted), plus the
    tuple the harness reads and ``expect``, which makes any other status a harness error."""

    def __init__(self, base: str, tls: ssl.SSLContext | None = None, timeout: float = 60) -> None:
        super().__init__(base, tls=tls, timeout=timeout)

    def call(self, method: str, path: str, **kw: Any) -> tuple[int, http.client.HTTPMessage, bytes]:
        answer = self.request(method, path, **kw)
        return answer.code, answer.headers, answer.body

    def expect(self, status: int, method: str, path: str, **kw: Any) -> tuple[http.client.HTTPMessage, bytes]:
        got, headers, body = self.call(method, path, **kw)
        if got != status:
            raise HarnessError(
                f"{method} {self.base_url}{path.split('?')[0]}: expected {status}, got {got}: {body[:500]!r}"
            )
        return headers, body


@dataclass
class User:
    phone: str
    token: str
    cookie: str = ""  # "demo_h5=<value>", once the H5 page was opened


@dataclass
class Deployment:
    """One database and the image store bound to it, with what the set-up made there through the API.

    A database is bound to one store (demo.common.images.rules.bind_store refuses another), so the
    local folder and the S3 store each get a database of their own, with their own users."""

    backend: str  # "local" (media_root) or "s3" (SeaweedFS)
    db: BenchDatabase
    storage_env: dict[str, str]  # DEMO_STORAGE & co. and the credentials; empty for the folder
    home_users: list[User] = field(default_factory=list)
    upload_users: list[User] = field(default_factory=list)
    image_id: str = ""
    image_bytes: bytes = b""


def set_cookie(headers: http.client.HTTPMessage, name: str, what: str) -> str:
    """The value of the cookie ``name`` that a response sets."""
    jar: SimpleCookie = SimpleCookie()
    for line in headers.get_all("Set-Cookie") or []:
        jar.load(line)
    if name not in jar:
        raise HarnessError(f"{what} set no {name} cookie: {headers}")
    return jar[name].value


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(-(-pct * len(ordered) // 100)) - 1))  # nearest rank
    return ordered[index]


def parallel_rate(fn, threads: int, seconds: float) -> float:
    """Calls per second of ``fn`` on ``threads`` threads at once (what the app's CPU pool can do when
    nothing else runs: shows GIL-held parts and memory-bandwidth contention that the one-call time hides)."""
    stop_at = time.perf_counter() + seconds
    counts = [0] * threads

    def loop(i: int) -> None:
        while time.perf_counter() < stop_at:
            fn()
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - started)


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm: first call allocates, imports, fills caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def connections_held(port: int, pids: list[int]) -> list[int]:
    """How many established TCP connections to local ``port`` each of ``pids`` holds (by socket inode)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()  # sl, local address:port (hex), remote, state (01: established), ..., inode
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    inodes.add(f"socket:[{fields[9]}]")
    held = []
    for pid in pids:
        links = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                links.append(os.readlink(fd))
        held.append(sum(link in inodes for link in links))
    return held


# -- the run -------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.duration = args.duration
        self.connections = args.connections
        self.users_per_group = 4 if self.smoke else 16
        self.memory_uploads = args.memory_uploads or (4 if self.smoke else 16)
        self.only = set(args.only.split(",")) if args.only else None
        self.skipped: set[str] = set()  # measures that cannot run here (the reason is in results["notes"])
        self.tmp = Path(tempfile.mkdtemp(prefix="demo-bench-"))
        self.servers: list[Server] = []
        self.nginx: Nginx | None = None
        self.seaweedfs: SeaweedFS | None = None
        self.deployments: list[Deployment] = []
        self.results: dict[str, Any] = {"ceilings": {}, "measures": {}, "notes": []}
        self.files: dict[str, Path] = {}
        self.spinners: list[subprocess.Popen] = []
        self.ceiling_timers: dict[str, Callable[[], float]] = {}  # ceiling name -> its rate, measured anew
        self.ceiling_brackets: dict[str, dict[str, float]] = {}
        self.started = time.monotonic()

    # -- selection ---------------------------------------------------------------------------------
    def wanted(self, name: str) -> bool:
        if name in self.skipped:
            return False
        if self.only is None or name in self.only:
            return True
        if name in CEILINGS:  # a ceiling is measured when a selected measure is compared with it
            return any(MEASURES[m][1] == name for m in self.only if m in MEASURES)
        return False

    def any_wanted(self, *names: str) -> bool:
        return any(self.wanted(n) for n in names)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    # -- environment -------------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        def version(dist: str) -> str | None:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                return None

        def first_line(cmd: list[str]) -> str | None:
            try:
                done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10)
                return (done.stdout or done.stderr).strip().splitlines()[0]
            except (OSError, IndexError, subprocess.TimeoutExpired):
                return None

        cpu_model = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            None,
        )
        commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "demo"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cores": CORES,
            "cpu": cpu_model,
            "load_average_at_start": os.getloadavg(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "tornado": version("tornado"),
            "pillow": version("pillow"),
            "argon2_cffi": version("argon2-cffi"),
            "sqlalchemy": version("SQLAlchemy"),
            "mysqlclient": version("mysqlclient"),
            "nginx": Nginx.version() if os.access("/usr/sbin/nginx", os.X_OK) else None,
            "wrk": first_line([wrk.wrk_path(), "-v"]),
            "openssl": first_line(["openssl", "version"]),
            "git_commit": commit,
            "demo_tree_modified": bool(dirty),
        }

    def server_env(self, deployment: Deployment) -> dict[str, str]:
        """What every demo process gets: the deployment's database and store (a temp media folder: the
        images, or with S3 only the uploads in progress), test numbers with a fixed code for the bench
        users, and quotas and limits nobody reaches in a benchmark."""
        numbers = ",".join(f"{phone}:{SMS_CODE}" for phone in self.phones("home") + self.phones("upload"))
        overrides = {f"DEMO_{name.upper()}": value for name, value in self.args.set}
        return {
            **overrides,
            **deployment.storage_env,
            "DEMO_COOKIE_SECRET": "bench-" + "k" * 42,  # 48 characters
            "DEMO_DATABASE_URL": deployment.db.url,
            "DEMO_MEDIA_ROOT": str(self.tmp / f"media-{deployment.backend}"),
            "DEMO_SMS_TEST_NUMBERS": numbers,
            "DEMO_IMAGE_QUOTA_COUNT": HUGE,
            "DEMO_IMAGE_QUOTA_BYTES": HUGE,
            "DEMO_LOGIN_PHONE_FAILURES": HUGE,
            "DEMO_LOGIN_IP_FAILURES": HUGE,
            "DEMO_LOGIN_SLOWDOWN_AFTER": HUGE,
            "DEMO_CODE_CHECKS_IP_HOURLY": HUGE,
            "DEMO_SMS_PHONE_DAILY": HUGE,
            "DEMO_SMS_IP_HOURLY": HUGE,
        } | {
            k: v
            for k, v in overrides.items()
            if k not in ("DEMO_DATABASE_URL", "DEMO_MEDIA_ROOT", *deployment.storage_env)
        }

    def phones(self, group: str) -> list[str]:
        base = {"home": 1000, "upload": 2000}[group]
        return [f"+861880000{base + i:04d}" for i in range(self.users_per_group)]  # CN mobile, 11 digits

    # -- orchestration -------------------------------------------------------------------------------
    def run(self) -> None:
        wrk.wrk_path()  # fails early when wrk is missing
        self.results["environment"] = self.environment()
        self.results["config"] = {
            "smoke": self.smoke,
            "duration_s": self.duration,
            "connections": self.connections,
            "wrk_threads": 2,
            "warmup_s": self.warmup_seconds(),
            "users_per_group": self.users_per_group,
            "quiet_wait_s": self.args.quiet_wait,
            "settings_overrides": dict(self.args.set),
            "busy_cpus": self.args.busy_cpus,
            "memory_uploads": self.memory_uploads,
            "only": sorted(self.only) if self.only else None,
        }
        with CpuMeter({}) as idle:
            time.sleep(1.0)
        self.results["environment"]["busy_before_start"] = idle.result
        if idle.result["foreign_cores"] > 0.25:
            self.log(
                f"WARNING: other processes keep {idle.result['foreign_cores']:.1f} of {CORES} cores busy: "
                "numbers will be low and ratios unreliable (see 'foreign CPU' below the table)"
            )
        self.skip_without_mariadb()
        self.make_images()
        if self.args.busy_cpus:
            self.start_spinners()
        if self.any_wanted("argon2", "pillow"):
            self.wait_quiet("argon2/Pillow ceilings")
        if self.wanted("argon2"):
            self.ceiling_argon2()
        if self.wanted("pillow"):
            self.ceiling_pillow()
        if self.wanted("hello"):
            self.ceiling_hello()
        local_nginx = self.any_wanted("image_nginx", "h5_home_nginx", "login_nginx") or self.named("nginx_static")
        if self.any_wanted(*LOCAL_MEASURES) or local_nginx:
            local = self.deployment("local", {})
            self.phase_one_process(local)
            if self.wanted("healthz_2proc"):
                self.measure_two_workers(local)
            if self.any_wanted("memory", "memory_animated"):
                self.phase_memory(local, ["memory", "memory_animated"])
            if local_nginx:
                self.phase_nginx(local)
            if self.any_wanted(*LB_MEASURES):
                self.phase_load_balancer(local)
        if self.any_wanted(*S3_MEASURES, "s3_direct"):
            self.phase_s3()

    def skip_without_mariadb(self) -> None:
        """The load balancer measures need MariaDB: the hosts share one database over the network, as
        a deployment's hosts do (SQLite is one host's file). Without it they are skipped with a note
        under the tables instead of failing the harness (the other local measures still need it)."""
        wanted = [name for name in LB_MEASURES if self.wanted(name)]
        if not wanted:
            return
        reason = mysql_unreachable_reason(MYSQL_SERVER, timeout=5)
        if reason:
            self.skipped.update(wanted)
            note = f"skipped {', '.join(wanted)}: {reason} (the app hosts must share one MariaDB database)"
            self.results["notes"].append(note)
            self.log(note)

    def named(self, name: str) -> bool:
        """``name`` is part of the run by itself (all run, or --only names it), not only as a ceiling."""
        return self.only is None or name in self.only

    def deployment(self, backend: str, storage_env: dict[str, str]) -> Deployment:
        """A fresh bench database for ``backend`` (dropped at the end, also on failure)."""
        deployment = Deployment(backend, BenchDatabase(), storage_env)
        deployment.db.create()
        self.deployments.append(deployment)
        self.results["environment"].setdefault("mariadb", deployment.db.version())
        key = "demo_settings" if backend == "local" else f"demo_settings_{backend}"
        self.results["config"][key] = self.demo_settings(deployment)
        return deployment

    def demo_settings(self, deployment: Deployment) -> dict[str, Any]:
        from demo.conf import settings as config

        s = config.load([], environ=self.server_env(deployment))  # every setting the demo processes run with
        return {k: v for k, v in s.items() if k not in ("cookie_secret", "sms_test_numbers", "config")}

    def warmup_seconds(self) -> int:
        return 0 if self.smoke else 2

    def make_images(self) -> None:
        info = {}
        for name, spec in bench_images.SPECS.items():
            data, noise = bench_images.generate(spec)
            path = self.tmp / f"{name}.jpg"
            path.write_bytes(data)
            self.files[name] = path
            info[name] = {
                "width": spec.width,
                "height": spec.height,
                "quality": spec.quality,
                "noise": noise,
                "bytes": len(data),
                "decoded_mib": round(spec.width * spec.height * 3 / MIB, 1),
            }
        self.results["images"] = info
        self.log(
            "images: "
            + ", ".join(f"{k} {v['width']}x{v['height']} {v['bytes'] / 1024:.0f} KiB" for k, v in info.items())
        )

    # -- ceilings ----------------------------------------------------------------------------------
    def ceiling_argon2(self) -> None:
        from demo.common.accounts.passwords import Passwords
        from demo.conf import settings as config

        s = config.load([], environ={f"DEMO_{name.upper()}": value for name, value in self.args.set})
        passwords = Passwords(s.argon2_time_cost, s.argon2_memory_kib, s.argon2_parallelism)
        self.cpu_ceiling(
            "argon2",
            lambda: passwords.hash(PASSWORD),
            9,
            "hash",
            "logins",
            f"median hash time (time_cost={s.argon2_time_cost}, memory={s.argon2_memory_kib} KiB, "
            f"parallelism={s.argon2_parallelism})",
        )

    def ceiling_pillow(self) -> None:
        from demo.common.images import imaging
        from demo.conf import settings as config

        work = self.tmp / "pillow"
        work.mkdir()
        src = str(self.files["upload"])

        max_animation_pixels = config.defaults().max_animation_pixels

        def once() -> None:
            os.unlink(imaging.process_upload(src, str(work), 40_000_000, max_animation_pixels).path)

        spec = bench_images.SPECS["upload"]
        self.cpu_ceiling(
            "pillow",
            once,
            7,
            "upload",
            "uploads",
            f"median demo.common.images.imaging.process_upload time on the {spec.width}x{spec.height} "
            f"{self.files['upload'].stat().st_size / MIB:.2f} MiB JPEG",
        )

    def cpu_ceiling(self, name: str, call: Callable[[], Any], repeats: int, unit: str, per: str, how: str) -> None:
        """A CPU-bound ceiling: cores / the median time of one ``call``; also timed again beside its
        measures (``ceiling_timers``) and, for reference, on one thread per core at once."""
        self.ceiling_timers[name] = lambda: CORES / self.quick_median(call)
        seconds, times = median_time(call, 3 if self.smoke else repeats)
        parallel = parallel_rate(call, CORES, 0.5 if self.smoke else 3)
        self.results["ceilings"][name] = {
            "label": CEILINGS[name],
            "rps": CORES / seconds,
            "seconds_median": seconds,
            "samples": times,
            "parallel_rps": parallel,
            "how": f"cores ({CORES}) / {how}",
        }
        self.log(
            f"{name}: {seconds * 1000:.1f} ms per {unit} -> ceiling {CORES / seconds:.1f} {per}/s "
            f"({parallel:.1f}/s measured on {CORES} threads)"
        )

    def ceiling_hello(self) -> None:
        # Left running (idle) for the measures compared with it: see time_ceiling.
        hello = self.start(HelloServer("hello", self.tmp))
        result = self.wrk_measure("hello", hello.url + "/", [hello])

        def rate() -> float:
            wait_idle([hello.pid])
            return wrk.run(
                hello.url + "/", duration=1 if self.smoke else 3, connections=self.connections, timeout_s=30
            ).rps

        self.ceiling_timers["hello"] = rate
        self.results["ceilings"]["hello"] = {
            "label": CEILINGS["hello"],
            "how": "wrk, one Tornado process",
            **result.as_dict(),
        }
        self.log(f"hello: {result.rps:.0f} req/s")

    # -- servers -----------------------------------------------------------------------------------
    def start(self, *servers: Server) -> Server:
        for server in servers:
            self.servers.append(server)
            server.start()
        for server in servers:
            server.wait_ready()
        return servers[0]

    def stop(self, *servers: Server) -> None:
        for server in servers:
            server.stop()
            if server in self.servers:
                self.servers.remove(server)

    def demo(self, name: str, deployment: Deployment, port: int | None = None) -> DemoServer:
        return DemoServer(name, self.tmp, self.server_env(deployment), port)

    # -- set-up through the API ------------------------------------------------------------------
    def register(self, client: Http, phone: str) -> tuple[User, str]:
        client.expect(200, "POST", "/users/code", json_body={"phone": phone})
        _, body = client.expect(
            201, "POST", "/users/regist", json_body={"phone": phone, "password": PASSWORD, "code": SMS_CODE}
        )
        session = json.loads(body)
        return User(phone, session["token"]), session["h5_url"]

    def open_h5(self, client: Http, h5_url: str) -> str:
        """Follow the ticket exchange once, then open the page once, as a WebView does; the cookie
        its jar then holds: ``demo_h5`` (the session; the forms' XSRF token is bound to it)."""
        headers, _ = client.expect(302, "GET", h5_url)
        cookie = f"demo_h5={set_cookie(headers, 'demo_h5', 'the H5 ticket exchange')}"
        client.expect(200, "GET", "/h5/home", headers={"Cookie": cookie})
        return cookie

    def upload(self, client: Http, user: User, path: Path) -> dict[str, Any]:
        _, body = client.expect(
            201,
            "POST",
            "/images",
            body=path.read_bytes(),
            headers={"Authorization": f"Bearer {user.token}", "Content-Type": "image/jpeg"},
        )
        return json.loads(body)["image"]

    def set_up_users(self, client: Http, deployment: Deployment) -> None:
        """Two groups of users: "home" users (H5 page and login; each owns 3 small images, so every
        home page is the same size) and "upload" users (the upload measures; their image count grows).
        Requests rotate over several users as real traffic does: one user would measure the lock on
        one users row, not the server. The S3 deployment measures no page and no login: its set-up is
        the upload users and one small image (the first upload user's)."""
        d = deployment
        if d.backend == "local":
            for phone in self.phones("home"):
                user, h5_url = self.register(client, phone)
                user.cookie = self.open_h5(client, h5_url)
                for _ in range(3):
                    image = self.upload(client, user, self.files["small"])
                    d.image_id = d.image_id or image["id"]
                d.home_users.append(user)
        for phone in self.phones("upload"):
            d.upload_users.append(self.register(client, phone)[0])
        if not d.image_id:
            d.image_id = self.upload(client, d.upload_users[0], self.files["small"])["id"]
        _, d.image_bytes = client.expect(200, "GET", f"/images/{d.image_id}.jpg")
        client.expect(200, "GET", f"/images/{d.image_id}.jpg?w=320")  # the thumbnail exists from now on
        for user in d.home_users:  # every cookie opens the page
            client.expect(200, "GET", "/h5/home", headers={"Cookie": user.cookie})
        key = "delivery_image" if d.backend == "local" else f"delivery_image_{d.backend}"
        self.results[key] = {"id": d.image_id, "stored_bytes": len(d.image_bytes)}
        self.log(
            f"set-up ({d.backend}): {len(d.home_users)} home users, {len(d.upload_users)} upload users, "
            f"image {d.image_id} ({len(d.image_bytes) / 1024:.1f} KiB stored)"
        )

    # -- wrk -----------------------------------------------------------------------------------------
    def lua_env(self, script: str | None, deployment: Deployment | None) -> dict[str, str]:
        if script is None or deployment is None:
            return {}
        if script == "cookie.lua":
            return {"BENCH_COOKIES": ",".join(u.cookie for u in deployment.home_users)}
        if script == "login.lua":
            return {"BENCH_PHONES": ",".join(u.phone for u in deployment.home_users), "BENCH_PASSWORD": PASSWORD}
        if script == "upload.lua":
            return {
                "BENCH_TOKENS": ",".join(u.token for u in deployment.upload_users),
                "BENCH_BODY_FILE": str(self.files["upload"]),
            }
        raise HarnessError(f"no environment for the wrk script {script}")

    def wrk_measure(
        self,
        name: str,
        url: str,
        servers: list[Server],
        script: str | None = None,
        deployment: Deployment | None = None,
        connections: int | None = None,
        workers: list[int] | None = None,
        midway: Callable[[], None] | None = None,
    ) -> wrk.WrkResult:
        """Settle, warm up, then one timed wrk run (with py-spy alongside when --profile is set).
        ``workers``: the forked workers of ``servers`` (counted with them), each one's CPU seconds
        during the run also apart, in ``cpu["worker_cpu_s"]``. ``midway``: called once, halfway
        through the timed run (in another thread)."""
        connections = connections or self.connections
        workers = workers or []
        pids = [s.pid for s in servers] + workers + self.store_pids()
        kw = {"connections": connections, "script": script, "env": self.lua_env(script, deployment), "timeout_s": 30}
        wait_idle(pids)
        self.wait_quiet(name)
        if self.warmup_seconds():
            wrk.run(url, duration=self.warmup_seconds(), **kw)
            wait_idle(pids)
        timer = self.ceiling_timers.get(MEASURES[name][1]) if name in TARGET_OF else None
        before = self.time_ceiling(timer, pids) if timer else None
        profiler = self.start_profiler(name, servers)
        with self.cpu_meter(servers, workers) as meter:
            before_each = [cpu_seconds(pid) for pid in workers]
            halfway = threading.Timer(self.duration / 2, midway) if midway else None
            if halfway:
                halfway.start()
            result = wrk.run(url, duration=self.duration, **kw)
            if halfway:
                halfway.join()
            split = [cpu_seconds(pid) - before for pid, before in zip(workers, before_each, strict=True)]
        self.finish_profiler(profiler)
        result.cpu = {**meter.result, **({"worker_cpu_s": split} if workers else {})}
        if timer:
            wait_idle(pids)
            self.ceiling_brackets[name] = {"before_rps": before, "after_rps": self.time_ceiling(timer, pids)}
        return result

    def time_ceiling(self, timer: Callable[[], float], pids: list[int]) -> float:
        """A targeted measure's ceiling, measured again right before and right after it: this VM's
        speed drifts (one hash took 19 ms, then 27 ms half a minute later; hello world ran 6,100/s,
        then 4,000/s minutes later, with nothing else running), so a ceiling taken minutes earlier
        moved ratios by 20 points either way. The measure is compared with the mean of the two."""
        wait_idle(pids)
        return timer()

    def quick_median(self, call: Callable[[], Any]) -> float:
        return median_time(call, 2 if self.smoke else 9)[0]

    def wait_quiet(self, name: str) -> None:
        """With --quiet-wait: wait (bounded) until other processes leave the CPUs alone."""
        if not self.args.quiet_wait:
            return
        deadline = time.monotonic() + self.args.quiet_wait
        while True:
            with CpuMeter(self.spinner_group()) as meter:
                time.sleep(0.5)
            if meter.result["foreign_cores"] < 0.1 or time.monotonic() > deadline:
                break
            self.log(f"{name}: waiting for a quiet machine (others use {meter.result['foreign_cores']:.1f} cores)")
            time.sleep(1.0)

    def spinner_group(self) -> dict[str, list[int]]:
        """The bench's own background processes, which are not foreign load: the --busy-cpus loops and
        SeaweedFS (idle between measures, but never at zero)."""
        groups = {"spinners": [p.pid for p in self.spinners]} if self.spinners else {}
        return groups | ({"seaweedfs": self.store_pids()} if self.store_pids() else {})

    def start_spinners(self) -> None:
        """--busy-cpus: one lowest-priority busy loop per CPU, so that no CPU ever goes idle. On a VM an
        idle vCPU halts, and waking it (every thread hand-off: event loop -> pool thread -> MariaDB ->
        back) costs far more than on bare metal; with the spinners that cost disappears from every
        measure alike, so comparing a run with and without shows how much of a result is wake-ups."""
        code = "import os\nos.nice(19)\nwhile True:\n    pass\n"
        for _ in range(CORES):
            self.spinners.append(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL))
        self.log(f"--busy-cpus: {CORES} nice-19 busy loops keep every CPU awake")

    def cpu_meter(self, servers: list[Server], workers: list[int] | None = None) -> CpuMeter:
        # SeaweedFS (in spinner_group) shares the cores: its CPU is counted, apart from demo's.
        groups = {"servers": [s.pid for s in servers] + (workers or []), **self.spinner_group()}
        if self.nginx is not None and self.nginx.proc is not None and self.nginx.proc.poll() is None:
            groups["nginx"] = [self.nginx.proc.pid, *self.nginx.worker_pids()]
        return CpuMeter(groups)

    def store_pids(self) -> list[int]:
        """The running SeaweedFS (one ``weed mini`` process), if any."""
        weed = self.seaweedfs
        return [weed.proc.pid] if weed is not None and weed.proc is not None and weed.proc.poll() is None else []

    def record(self, name: str, result: wrk.WrkResult, **extra: Any) -> None:
        label, ceiling = MEASURES[name]
        bracket = self.ceiling_brackets.pop(name, None)
        if bracket:
            extra = {**extra, "ceiling_beside": bracket}
        self.results["measures"][name] = {"label": label, "ceiling": ceiling, **result.as_dict(), **extra}
        self.log(
            f"{name}: {result.rps:.1f} req/s, p50 {fmt_ms(result.p50_ms)}, p99 {fmt_ms(result.p99_ms)}, "
            f"errors {result.errors}"
        )

    # -- profiling (optional) ------------------------------------------------------------------------
    def start_profiler(self, name: str, servers: list[Server]) -> list[subprocess.Popen]:
        if not self.args.profile:
            return []
        folder = Path(self.args.profile)
        folder.mkdir(parents=True, exist_ok=True)
        procs = []
        for server in servers:
            if not isinstance(server, DemoServer):
                continue
            # Two samplers: every thread (a thread waiting for MariaDB inside the driver counts as busy
            # there: where requests wait), and only the thread holding the GIL (where Python CPU goes:
            # the event loop competes for it with every pool thread running Python code).
            for suffix, extra in (("threads", []), ("gil", ["--gil"])):
                out = folder / f"{name}-{server.name}.{suffix}.txt"
                procs.append(
                    subprocess.Popen(
                        [
                            str(PY_SPY),
                            "record",
                            "--pid",
                            str(server.pid),
                            "--duration",
                            str(self.duration),
                            "--rate",
                            "200",
                            "--format",
                            "raw",
                            "--threads",
                            "--nonblocking",
                            *extra,
                            "--output",
                            str(out),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        return procs

    def finish_profiler(self, procs: list[subprocess.Popen]) -> None:
        from bench.stacks import summarise

        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            out = Path(proc.args[proc.args.index("--output") + 1])
            if out.exists():
                out.with_suffix(".summary.txt").write_text(summarise(out) + "\n")

    # -- phase 1: one demo process, direct -------------------------------------------------------
    def phase_one_process(self, local: Deployment) -> None:
        server = self.start(self.demo("demo-1", local))
        self.log(f"demo (1 process) on {server.url}, database {local.db.name}")
        try:
            client = Http(server.url)
            self.set_up_users(client, local)
            one = [server]
            plan = [
                ("healthz", "/healthz", None),
                ("image_direct", f"/images/{local.image_id}.jpg", None),
                ("thumbnail", f"/images/{local.image_id}.jpg?w=320", None),
                ("h5_home", "/h5/home", "cookie.lua"),
                ("login", "/users/login", "login.lua"),
                ("upload", "/images", "upload.lua"),
            ]
            for name, path, script in plan:
                if self.wanted(name):
                    self.record(name, self.wrk_measure(name, server.url + path, one, script, local))
            if self.wanted("loop_health"):
                self.measure_loop_health(server, local)
        finally:
            self.stop(server)

    def measure_two_workers(self, local: Deployment) -> None:
        """healthz_2proc: GET /healthz on one port served by ``--processes=2`` (a SO_REUSEPORT socket
        per worker), with each worker's CPU seconds: workers sharing one accepting socket left one of
        them doing nearly all the work (issue 16, point 5); an even split shows the kernel's spread."""
        server = DemoServer("demo-2proc", self.tmp, {**self.server_env(local), "DEMO_PROCESSES": "2"})
        self.start(server)
        try:
            workers = forked_workers(server.pid, 2)
            Http(server.url).expect(200, "GET", "/healthz")
            held: list[int] = []

            def count() -> None:
                held.extend(connections_held(server.port, workers))

            result = self.wrk_measure("healthz_2proc", server.url + "/healthz", [server], workers=workers, midway=count)
            split = result.cpu["worker_cpu_s"]
            one = self.results["measures"].get("healthz", {}).get("rps")
            self.record("healthz_2proc", result, vs_healthz=result.rps / one if one else None, connections_held=held)
            self.log(
                f"healthz_2proc: wrk's connections per worker {' / '.join(map(str, held))}, workers' CPU "
                f"{' / '.join(f'{s:.1f}' for s in split)} s in {self.duration} s"
                + (f", {result.rps / one:.2f}x the 1-process healthz" if one else "")
            )
        finally:
            self.stop(server)

    def measure_loop_health(self, server: DemoServer, local: Deployment) -> None:
        """Logins and uploads saturate the process (two wrk runs, half the connections each) while a
        probe sends GET /healthz every 10 ms, one at a time, on a keep-alive connection."""
        wait_idle([server.pid])
        self.wait_quiet("loop_health")
        half = max(1, self.connections // 2)
        duration = max(self.duration, 2)
        ramp = min(1.0, duration / 4)
        profiler = self.start_profiler("loop_health", [server])
        runs = [
            wrk.start(
                server.url + path,
                duration=duration,
                connections=half,
                script=script,
                env=self.lua_env(script, local),
                timeout_s=30,
            )
            for path, script in (("/users/login", "login.lua"), ("/images", "upload.lua"))
        ]
        time.sleep(ramp)
        probe = Probe("127.0.0.1", server.port, "/healthz")
        with self.cpu_meter([server]) as meter:
            probe.run(duration - 2 * ramp)
        login, upload = (wrk.finish(run) for run in runs)
        self.finish_profiler(profiler)
        target = TARGET_OF["loop_health"]
        p99 = percentile(probe.latencies, 99)
        self.results["measures"]["loop_health"] = {
            "label": MEASURES["loop_health"][0],
            "ceiling": None,
            "probe_requests": len(probe.latencies),
            "probe_interval_ms": probe.interval * 1000,
            "rps": len(probe.latencies) / probe.elapsed if probe.elapsed else 0.0,
            "p50_ms": percentile(probe.latencies, 50),
            "p99_ms": p99,
            "max_ms": max(probe.latencies, default=None),
            "probe_errors": probe.errors,
            "cpu": meter.result,
            "errors": probe.errors + login.errors + upload.errors,
            "load": {"login": login.as_dict(), "upload": upload.as_dict()},
            "value": p99,
            "met": target.met(p99),
        }
        self.log(
            f"loop_health: /healthz p50 {fmt_ms(percentile(probe.latencies, 50))}, p99 {fmt_ms(p99)} "
            f"({len(probe.latencies)} probes) under {login.rps:.1f} logins/s + {upload.rps:.1f} uploads/s"
        )

    # -- phase 2: memory -----------------------------------------------------------------------------
    def phase_memory(self, deployment: Deployment, names: list[str]) -> None:
        """For each case a fresh process (warmed by one small upload): RSS before, peak RSS (VmHWM,
        reset first) during its bursts. "memory" (and "memory_s3", on the S3 store): N concurrent raw
        uploads of the 8 MiB JPEG by N different users. "memory_animated": N concurrent uploads of an
        animated GIF (each with other bytes), then N concurrent requests for their 160-wide thumbnails
        (made then)."""
        for name in names:
            if not self.wanted(name):
                continue
            server = self.start(self.demo(f"demo-{name}", deployment))
            try:
                client = Http(server.url, timeout=300)
                users = (deployment.upload_users * self.memory_uploads)[: self.memory_uploads]
                self.upload(client, users[0], self.files["small"])  # imports, thread pools, DB connections
                client.expect(200, "GET", "/healthz")
                if name in ("memory", "memory_s3"):
                    body = self.files["large"].read_bytes()
                    self.memory_case(
                        server,
                        name,
                        [[self.uploader(client, u, body, "image/jpeg") for u in users]],
                        f"{len(users)} x {len(body) / MIB:.1f} MiB uploads",
                        upload_bytes=len(body),
                    )
                    continue
                gif = bench_images.animation()
                ids: list[str] = []
                uploads = [
                    self.uploader(client, u, bench_images.with_comment(gif, f"upload {n}"), "image/gif", ids)
                    for n, u in enumerate(users)
                ]
                thumbnails = [
                    lambda n=n, client=client, ids=ids: (
                        client.call("GET", f"/images/{ids[n]}.gif?w=160")[0] if n < len(ids) else "no image"
                    )
                    for n in range(len(users))
                ]
                self.memory_case(
                    server,
                    name,
                    [uploads, thumbnails],
                    f"{len(users)} x {len(gif) / MIB:.1f} MiB animated GIF uploads + thumbnails",
                    upload_bytes=len(gif),
                    animation=bench_images.ANIMATION,
                )
            finally:
                self.stop(server)

    @staticmethod
    def uploader(
        client: Http, user: User, body: bytes, content_type: str, ids: list[str] | None = None
    ) -> Callable[[], int]:
        """One raw upload by ``user`` as a call returning its status (the new id appended to ``ids``)."""

        def one() -> int:
            status, _, answer = client.call(
                "POST",
                "/images",
                body=body,
                headers={"Authorization": f"Bearer {user.token}", "Content-Type": content_type},
            )
            if ids is not None and status == 201:
                ids.append(json.loads(answer)["image"]["id"])
            return status

        return one

    def memory_case(
        self, server: Server, name: str, bursts: list[list[Callable[[], int]]], what: str, **extra: Any
    ) -> None:
        """Run each burst's calls at once (one thread each, released together), bursts one after the
        other; record RSS before, the peak (VmHWM, reset first, and sampled) and after."""
        wait_idle([server.pid])
        rss_before = proc_status_kib(server.pid, "VmRSS")
        reset_peak_rss(server.pid)
        hwm_reset = proc_status_kib(server.pid, "VmHWM")
        statuses: list[int | str] = []
        latencies: list[float] = []
        lock = threading.Lock()
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    samples.append(proc_status_kib(server.pid, "VmRSS"))
                except (OSError, HarnessError):
                    return
                done.wait(0.02)

        def run(call: Callable[[], int], gate: threading.Barrier) -> None:
            gate.wait(timeout=30)
            started = time.perf_counter()
            try:
                status: int | str = call()
            except OSError as error:
                status = f"{type(error).__name__}"
            with lock:
                statuses.append(status)
                latencies.append(time.perf_counter() - started)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        for calls in bursts:
            gate = threading.Barrier(len(calls))
            threads = [threading.Thread(target=run, args=(c, gate), daemon=True) for c in calls]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            if any(t.is_alive() for t in threads):
                raise HarnessError(f"{name}: calls still running after 300 s")
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join(timeout=5)
        hwm = proc_status_kib(server.pid, "VmHWM")
        wait_idle([server.pid])
        rss_after = proc_status_kib(server.pid, "VmRSS")
        growth = (hwm - rss_before) / 1024
        calls = len(statuses)
        self.results["measures"][name] = {
            "label": MEASURES[name][0].format(n=len(bursts[0])),
            "ceiling": None,
            "uploads": len(bursts[0]),
            **extra,
            "statuses": dict(Counter(map(str, statuses))),
            "errors": sum(1 for s in statuses if s not in (200, 201)),
            "rss_before_mib": rss_before / 1024,
            "hwm_after_reset_mib": hwm_reset / 1024,
            "peak_rss_mib": hwm / 1024,
            "peak_rss_sampled_mib": max(samples, default=0) / 1024,
            "rss_after_mib": rss_after / 1024,
            "growth_mib": growth,
            "seconds": elapsed,
            "rps": calls / elapsed,
            "p50_ms": percentile([x * 1000 for x in latencies], 50),
            "p99_ms": percentile([x * 1000 for x in latencies], 99),
            "value": growth,
            "met": TARGET_OF[name].met(growth),
        }
        self.log(
            f"{name}: RSS {rss_before / 1024:.1f} MiB -> peak {hwm / 1024:.1f} MiB (+{growth:.1f} MiB), "
            f"{what} in {elapsed:.1f}s, statuses {Counter(statuses)}"
        )

    # -- phase 3: two processes behind the shipped nginx config -----------------------------------
    def phase_nginx(self, deployment: Deployment) -> None:
        """Two demo processes on the deployment's database and store behind the shipped nginx config.
        Local: the static ceiling, the image (warm), the H5 page and logins. S3: the image warm, then
        with nginx's image cache off (see phase_s3)."""
        d = deployment
        suffix = "" if d.backend == "local" else f"-{d.backend}"
        a, b = self.demo(f"demo{suffix}-a", d), self.demo(f"demo{suffix}-b", d)
        self.start(a, b)
        try:
            if d.backend == "local":
                self.nginx_local(d, [a, b])
            else:
                self.nginx_s3(d, [a, b])
        finally:
            self.stop(a, b)

    def start_nginx(
        self,
        folder: Path,
        servers: list[Server],
        image: bytes,
        extra: list[tuple[str, str]] | None = None,
        store_endpoint: str | None = None,
        ports: list[int] | None = None,
    ) -> Http:
        """nginx with the shipped config (plus ``extra`` replacements) in front of ``servers`` (or of
        ``ports``, the two the shipped upstream names, when ``extra`` rewrites it), serving ``image``
        from /static/bench.jpg for the static ceiling, which from now on is also measured beside the
        targeted measures through this nginx; a client for it."""
        static = folder / "static"
        shutil.copytree(ROOT / "demo" / "static", static)
        (static / "bench.jpg").write_bytes(image)  # byte for byte the image nginx caches
        ports = ports or [s.port for s in servers]
        self.nginx = (
            Nginx(folder, ports, static, extra, store_endpoint=store_endpoint)
            if store_endpoint
            else Nginx(folder, ports, static, extra)
        ).start()
        tls = ssl.create_default_context(cafile=str(self.nginx.tls / "cert.pem"))
        client = Http(self.nginx.base_url, tls)
        nginx = self.nginx

        def nginx_up() -> bool:
            if nginx.proc.poll() is not None:
                raise HarnessError(f"nginx exited:\n{nginx.logs()}")
            try:
                return client.call("GET", "/healthz")[0] == 200
            except OSError:
                return False

        wait_until(nginx_up, "nginx to answer", timeout=30, every=0.1, error=HarnessError)
        self.log(f"nginx {nginx.base_url} -> demo {', '.join(f'{s.address}:{s.port}' for s in servers)}")
        static_url = nginx.base_url + "/static/bench.jpg"
        self.ceiling_timers["nginx_static"] = lambda: (
            wrk.run(static_url, duration=1 if self.smoke else 3, connections=self.connections, timeout_s=30).rps
        )
        return client

    def stop_nginx(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        self.ceiling_timers.pop("nginx_static", None)

    def prime_image(self, client: Http, image_path: str, cached: bool) -> str | None:
        """Fetch the image twice (the first fills nginx's cache when it has one: the second must then be
        a HIT) and check that it is byte for byte the static ceiling's file; its X-Cache-Status."""
        client.expect(200, "GET", image_path)
        headers, body = client.expect(200, "GET", image_path)
        _, static_body = client.expect(200, "GET", "/static/bench.jpg")
        if body != static_body:
            raise HarnessError("the static ceiling file differs from the image served through nginx")
        cache_status = headers.get("X-Cache-Status")
        if cached and cache_status is not None and cache_status != "HIT":
            raise HarnessError(f"second request for the image was not a cache HIT: {cache_status}")
        if not cached and cache_status == "HIT":
            raise HarnessError("the image came from nginx's cache, which this measure turns off")
        return cache_status

    def measure_nginx_static(self, servers: list[Server]) -> None:
        assert self.nginx is not None
        result = self.wrk_measure("nginx_static", self.nginx.base_url + "/static/bench.jpg", servers)
        self.results["ceilings"]["nginx_static"] = {
            "label": CEILINGS["nginx_static"],
            **result.as_dict(),
            "how": "wrk over TLS to the rendered shipped config, /static/ location, a file byte-identical "
            "to the cached image",
        }
        self.log(f"nginx_static: {result.rps:.0f} req/s")

    def nginx_local(self, local: Deployment, both: list[Server]) -> None:
        client = self.start_nginx(self.tmp, both, local.image_bytes)
        try:
            image_path = f"/images/{local.image_id}.jpg"
            cache_status = self.prime_image(client, image_path, cached=True)
            if self.named("nginx_static"):
                self.measure_nginx_static(both)
            if self.wanted("image_nginx"):
                before = self.cache_log_counts(image_path)
                result = self.wrk_measure("image_nginx", self.nginx.base_url + image_path, both)
                after = self.cache_log_counts(image_path)
                statuses = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                self.record("image_nginx", result, x_cache_status=cache_status, cache_statuses=statuses)
            for name, path, script in (
                ("h5_home_nginx", "/h5/home", "cookie.lua"),
                ("login_nginx", "/users/login", "login.lua"),
            ):
                if self.wanted(name):
                    self.record(name, self.wrk_measure(name, self.nginx.base_url + path, both, script, local))
        finally:
            self.stop_nginx()

    def cache_log_counts(self, path: str) -> dict[str, int]:
        """cache=HIT/MISS/... counts for ``path`` in nginx's access log (the shipped log format)."""
        counts: Counter[str] = Counter()
        log = self.nginx.dir / "logs" / "demo.access.log"
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if f" {path} " in line and " cache=" in line:
                    counts[line.split(" cache=", 1)[1].split(" ", 1)[0]] += 1
        return dict(counts)

    # -- phase 3b: app hosts behind the load balancer (issue 16, point 6) ---------------------------------
    def phase_load_balancer(self, local: Deployment) -> None:
        """GET /h5/home through nginx (the shipped config) to two app hosts, then to one: each host a
        ``--processes=2`` server on a loopback address of its own (127.0.0.2, 127.0.0.3), all on the
        local deployment's MariaDB database with the same cookie secret (the cookies the set-up made
        work on every host). Each view checks the session, records the visit (an UPDATE) and reads the
        user's images: the page the app's WebView opens, and a real write to the shared database.

        The two-host run goes first, then the second host stops and the same nginx upstream is
        rendered with the first host alone: a host not in a measure must not be running during it
        (its idle CPU would count as foreign). The cores are shared by everything here, so a second
        host adds no CPU to the machine: CPU per request is the comparison, not req/s."""
        env = {**self.server_env(local), "DEMO_PROCESSES": "2"}
        count = 2 if self.wanted("h5_home_lb_2hosts") else 1
        hosts = [DemoServer(f"demo-host{n + 1}", self.tmp, env, address=LB_HOSTS[n]) for n in range(count)]
        self.start(*hosts)
        try:
            workers = {host.name: forked_workers(host.pid, 2) for host in hosts}
            for name, serving in (("h5_home_lb_2hosts", hosts), ("h5_home_lb_1host", hosts[:1])):
                if not self.wanted(name):
                    continue
                self.stop(*[host for host in hosts if host not in serving])
                self.measure_load_balancer(name, local, serving, workers)
        finally:
            self.stop(*hosts)

    def measure_load_balancer(
        self, name: str, local: Deployment, hosts: list[DemoServer], workers: dict[str, list[int]]
    ) -> None:
        """One wrk run on GET /h5/home through nginx to ``hosts``; the app CPU is every worker's and
        supervisor's, each worker's also apart; nginx's access log says how many views each host served."""
        # The shipped upstream names two servers (127.0.0.1:8001 and :8002): each becomes a host's
        # address and port; with one host the second line is commented out (the shipped file's advice
        # for one --processes=N server: a single server line).
        second = hosts[1].port if len(hosts) > 1 else free_port_on("127.0.0.1")
        extra = [(f"server 127.0.0.1:{hosts[0].port} ", f"server {hosts[0].address}:{hosts[0].port} ")]
        if len(hosts) > 1:
            extra.append((f"server 127.0.0.1:{second} ", f"server {hosts[1].address}:{second} "))
        else:
            extra.append((f"server 127.0.0.1:{second} ", f"# one host (bench): server 127.0.0.1:{second} "))
        folder = self.tmp / f"nginx-lb-{len(hosts)}"
        self.start_nginx(folder, list(hosts), local.image_bytes, extra, ports=[hosts[0].port, second])
        assert self.nginx is not None
        try:
            before = self.upstream_counts("/h5/home")
            pids = [pid for host in hosts for pid in workers[host.name]]
            held: list[int] = []

            def count() -> None:  # nginx's connections to each worker (its keep-alive pool), halfway
                for host in hosts:
                    held.extend(connections_held(host.port, workers[host.name]))

            result = self.wrk_measure(
                name, self.nginx.base_url + "/h5/home", list(hosts), "cookie.lua", local, workers=pids, midway=count
            )
            after = self.upstream_counts("/h5/home")
        finally:
            self.stop_nginx()
        served = {addr: after.get(addr, 0) - before.get(addr, 0) for addr in after}
        expected = {f"{host.address}:{host.port}" for host in hosts}
        if set(served) - expected or any(not served.get(addr) for addr in expected):
            raise HarnessError(f"{name}: views per upstream {served}, expected some on each of {sorted(expected)} only")
        split = result.cpu["worker_cpu_s"]
        host_cpu = [sum(split[n * 2 : n * 2 + 2]) for n in range(len(hosts))]
        self.record(
            name,
            result,
            hosts=[{"address": h.address, "port": h.port, "processes": 2, "workers": workers[h.name]} for h in hosts],
            views_per_host=served,
            host_cpu_s=host_cpu,
            connections_held=held,
        )
        self.log(
            f"{name}: views per host (nginx log, warm-up included) "
            + ", ".join(f"{addr} {n}" for addr, n in sorted(served.items()))
            + f"; nginx's connections per worker {' / '.join(map(str, held))}"
            + f", workers' CPU {' / '.join(f'{s:.1f}' for s in split)} s in {self.duration} s"
        )

    def upstream_counts(self, path: str) -> Counter[str]:
        """Requests for ``path`` in nginx's access log (the shipped format) by the upstream that
        answered (``up=<address:port>/...``; the last one when nginx tried several)."""
        assert self.nginx is not None
        counts: Counter[str] = Counter()
        log = self.nginx.dir / "logs" / "demo.access.log"
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if f" {path} " in line and " up=" in line:
                    upstream = line.split(" up=", 1)[1].split("/", 1)[0]
                    counts[upstream.rsplit(", ", 1)[-1]] += 1
        return counts

    def store_fetches(self, image: bytes) -> int:
        """Requests for ``image`` that nginx fetched from the store: lines of the loopback image server's
        access log for its internal /_store/ location and its blob (named by the bytes' SHA-256), whose
        upstreams are the app, then (after " : ", an internal redirect) the store."""
        assert self.nginx is not None and self.seaweedfs is not None
        log = self.nginx.dir / "logs" / "demo.images.log"
        blob = f"/{hashlib.sha256(image).hexdigest()} "
        store = f" : {urlsplit(self.seaweedfs.endpoint).netloc}/"
        if not log.exists():
            return 0
        lines = log.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if " /_store/" in line and blob in line and store in line)

    # -- phase 4: the object store (issue 15) ----------------------------------------------------------
    def phase_s3(self) -> None:
        """The same image and upload on the S3 backend: SeaweedFS (tests/helpers.py's, one ``weed mini``
        process on loopback, sharing the cores; its CPU is counted apart) and a database of its own.
        One process: the direct-from-store ceiling, the image direct, the upload; then the memory case;
        then two processes behind nginx, warm (cache hits) and with the image cache off."""
        reason = SeaweedFS.missing()
        if reason:
            raise HarnessError(reason)
        self.seaweedfs = SeaweedFS(self.tmp / "seaweedfs")
        try:
            self.seaweedfs.start()
        except AssertionError:
            raise HarnessError(f"SeaweedFS exited:\n{self.seaweedfs.log()}") from None
        self.log(f"SeaweedFS (pid {self.seaweedfs.proc.pid}) S3 on {self.seaweedfs.endpoint}")
        settings = self.seaweedfs.settings(S3_PREFIX)
        storage_env = {f"DEMO_{name.upper()}": str(value) for name, value in settings.items()} | S3_CREDENTIALS
        s3 = self.deployment("s3", storage_env)
        # Without its in-memory copy of small files the process reads the store for every image
        # request: image_direct_s3 measures that path (the upload does not use the copy).
        env = {"DEMO_IMAGE_MEMORY_CACHE": "0"} | self.server_env(s3)
        server = self.start(DemoServer("demo-s3", self.tmp, env))
        self.log(f"demo (1 process, S3 store {settings['storage']}) on {server.url}, database {s3.db.name}")
        try:
            self.set_up_users(Http(server.url), s3)
            if self.wanted("s3_direct"):
                self.ceiling_s3_direct(s3)
            for name, path, script in (
                ("image_direct_s3", f"/images/{s3.image_id}.jpg", None),
                ("upload_s3", "/images", "upload.lua"),
            ):
                if self.wanted(name):
                    self.record(name, self.wrk_measure(name, server.url + path, [server], script, s3))
        finally:
            self.stop(server)
        if self.wanted("memory_s3"):
            self.phase_memory(s3, ["memory_s3"])
        if self.any_wanted("image_nginx_s3", "image_nginx_s3_cold"):
            self.phase_nginx(s3)

    def presigned_url(self, s3: Deployment) -> str:
        """A presigned GET URL for the delivery image's blob, valid for an hour, signed here with the
        bench's credentials (the form the app signs for nginx, with a longer life)."""
        import obstore
        from obstore.store import S3Store

        from demo.common.images.storage import object_name

        assert self.seaweedfs is not None
        bucket, _, prefix = s3.storage_env["DEMO_STORAGE"].removeprefix("s3://").partition("/")
        store = S3Store(
            bucket,
            config={
                "endpoint": self.seaweedfs.endpoint,
                "region": s3.storage_env["DEMO_S3_REGION"],
                "access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            },
            client_options={"allow_http": True},
        )
        sha256 = hashlib.sha256(s3.image_bytes).hexdigest()  # blobs are named by the hash of their bytes
        return obstore.sign(store, "GET", f"{prefix}/{object_name(sha256)}", dt.timedelta(hours=1))

    def ceiling_s3_direct(self, s3: Deployment) -> None:
        """wrk GETs the delivery image's object straight from SeaweedFS with a presigned URL (plain
        HTTP on loopback, one connection per wrk connection, as nginx's keep-alive upstream does)."""
        url = self.presigned_url(s3)
        _, body = Http(url).expect(200, "GET", url)
        if body != s3.image_bytes:
            raise HarnessError("the presigned URL's object differs from the image the app serves")
        result = self.wrk_measure("s3_direct", url, [])

        def rate() -> float:
            return wrk.run(url, duration=1 if self.smoke else 3, connections=self.connections, timeout_s=30).rps

        self.ceiling_timers["s3_direct"] = rate
        self.results["ceilings"]["s3_direct"] = {
            "label": CEILINGS["s3_direct"],
            **result.as_dict(),
            "how": "wrk, plain HTTP to SeaweedFS's S3 port, a presigned GET of the blob of the image measured "
            "through nginx (same object); SeaweedFS shares the cores",
        }
        self.log(f"s3_direct: {result.rps:.0f} req/s")

    def nginx_s3(self, s3: Deployment, both: list[Server]) -> None:
        """Warm: the shipped config, the image from nginx's cache (the path is the local folder's: the
        store is not touched). Cold: the same config with the image location's ``proxy_cache off;``, so
        every request goes nginx -> app (X-Accel-Redirect, no body) -> nginx -> SeaweedFS (presigned)."""
        assert self.seaweedfs is not None
        image_path = f"/images/{s3.image_id}.jpg"
        for name, folder, extra in (
            ("image_nginx_s3", self.tmp / "nginx-s3-warm", []),
            ("image_nginx_s3_cold", self.tmp / "nginx-s3-cold", [("proxy_cache demo_images;", "proxy_cache off;")]),
        ):
            if not self.wanted(name):
                continue
            client = self.start_nginx(folder, both, s3.image_bytes, extra, store_endpoint=self.seaweedfs.endpoint)
            try:
                cache_status = self.prime_image(client, image_path, cached=name == "image_nginx_s3")
                if not self.store_fetches(s3.image_bytes):
                    raise HarnessError(
                        f"{name}: nginx did not fetch the image from the store (no X-Accel-Redirect from the app?)"
                    )
                if name == "image_nginx_s3" and "nginx_static" not in self.results["ceilings"]:
                    self.measure_nginx_static(both)
                if name == "image_nginx_s3_cold" and "s3_direct" not in self.results["ceilings"]:
                    self.ceiling_s3_direct(s3)
                cache_before, store_before = self.cache_log_counts(image_path), self.store_fetches(s3.image_bytes)
                result = self.wrk_measure(name, self.nginx.base_url + image_path, both)
                cache_after = self.cache_log_counts(image_path)
                statuses = {k: cache_after.get(k, 0) - cache_before.get(k, 0) for k in cache_after}
                fetched = self.store_fetches(s3.image_bytes) - store_before
                self.record(name, result, x_cache_status=cache_status, cache_statuses=statuses, store_fetches=fetched)
            finally:
                self.stop_nginx()

    # -- teardown ------------------------------------------------------------------------------------
    def teardown(self, failed: bool) -> None:
        if failed:
            for server in self.servers:
                print(server.logs(), file=sys.stderr)
            if self.nginx is not None:
                print(self.nginx.logs(), file=sys.stderr)
            if self.seaweedfs is not None:
                print(f"--- SeaweedFS ---\n{self.seaweedfs.log()}", file=sys.stderr)
        if self.nginx is not None:
            try:
                self.nginx.stop()
            except Exception:  # noqa: BLE001 - keep tearing down
                traceback.print_exc()
        for server in list(self.servers):
            try:
                self.stop(server)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        if self.seaweedfs is not None:
            try:
                self.seaweedfs.stop()  # SIGKILL to its process group: its state is in the temp folder
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        for deployment in self.deployments:
            try:
                deployment.db.drop()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        for spinner in self.spinners:
            spinner.kill()
            spinner.wait(timeout=10)
        self.spinners.clear()
        if self.args.keep:
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class Probe:
    """Sequential GET requests every ``interval`` on one keep-alive connection; latencies in ms."""

    def __init__(self, host: str, port: int, path: str, interval: float = 0.010) -> None:
        self.host, self.port, self.path, self.interval = host, port, path, interval
        self.latencies: list[float] = []
        self.errors = 0
        self.elapsed = 0.0

    def run(self, seconds: float) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        started = time.perf_counter()
        next_send = started
        try:
            while time.perf_counter() - started < seconds:
                sent = time.perf_counter()
                try:
                    conn.request("GET", self.path)
                    answer = conn.getresponse()
                    answer.read()
                    if answer.status != 200:
                        self.errors += 1
                except (OSError, http.client.HTTPException):
                    self.errors += 1
                    conn.close()
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                self.latencies.append((time.perf_counter() - sent) * 1000)
                next_send = max(next_send + self.interval, time.perf_counter())
                time.sleep(max(0.0, next_send - time.perf_counter()))
        finally:
            conn.close()
            self.elapsed = time.perf_counter() - started


# -- report ----------------------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def fmt_rps(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def evaluate(results: dict[str, Any]) -> list[str]:
    """Fill ratio/target/met into each measure; the list of missed targets."""
    ceilings = results["ceilings"]
    missed = []
    total_errors = 0
    for _name, m in [*results["ceilings"].items(), *results["measures"].items()]:
        cpu, done = m.get("cpu"), m.get("requests") or m.get("probe_requests")
        if cpu and done:  # CPU milliseconds per completed request, by process group
            skip = ("foreign_cores", "machine_busy_cores", "steal_cores", "spinners_cores")
            m["cpu_ms_per_request"] = {
                k.removesuffix("_cores"): v * cpu["wall_s"] * 1000 / done
                for k, v in cpu.items()
                if k.endswith("_cores") and k not in skip
            }
    for name, m in results["measures"].items():
        total_errors += m.get("errors", 0)
        ceiling = ceilings.get(m.get("ceiling") or "")
        if ceiling and ceiling.get("rps"):
            m["ceiling_rps"] = measure_ceiling_rps(m, ceiling)
            m["ratio"] = m["rps"] / m["ceiling_rps"]
            m["value"] = m["ratio"]
        target = TARGET_OF.get(name)
        if target:
            m["target"] = target.text
            m["met"] = target.met(m.get("value"))
            if m["met"] is False:
                missed.append(f"{m['label']}: {describe_value(target, m.get('value'))}, target {target.text}")
    results["total_errors"] = total_errors
    if total_errors:
        missed.append(f"errors: {total_errors} (non-2xx where 2xx was expected, socket errors), target 0")
    results["missed"] = missed
    return missed


def measure_ceiling_rps(m: dict[str, Any], ceiling: dict[str, Any]) -> float:
    """The ceiling a measure is compared with: for a targeted measure, the mean of its ceiling
    measured right before and right after it (see Bench.time_ceiling); else the run's."""
    beside = m.get("ceiling_beside")
    if beside:
        return (beside["before_rps"] + beside["after_rps"]) / 2
    return ceiling["rps"]


def describe_value(target: Target, value: float | None) -> str:
    if value is None:
        return "—"
    if target.kind == "ratio":
        return f"{value:.0%}"
    if target.kind == "p99_ms":
        return f"p99 {fmt_ms(value)}"
    return f"+{value:.1f} MiB"


def table(results: dict[str, Any]) -> str:
    ceilings = results["ceilings"]
    lines = [
        "| measure | req/s | p50 | p99 | errors | ceiling | ratio | target | met? |",
        "|---|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for name in MEASURES:
        m = results["measures"].get(name)
        if m is None:
            continue
        target = TARGET_OF.get(name)
        ceiling = ceilings.get(m.get("ceiling") or "")
        ceiling_text = f"{ceiling['label'].split(' (')[0]}: {fmt_rps(m.get('ceiling_rps'))}/s" if ceiling else "—"
        if m.get("ceiling_beside"):
            ceiling_text += " (measured beside it)"
        if target and target.kind != "ratio":
            ratio = describe_value(target, m.get("value"))
        else:
            ratio = f"{m['ratio']:.0%}" if m.get("ratio") is not None else "—"
        met = {True: "yes", False: "**no**", None: ""}[m.get("met")] if target else ""
        lines.append(
            f"| {m['label']} | {fmt_rps(m.get('rps'))} | {fmt_ms(m.get('p50_ms'))} | "
            f"{fmt_ms(m.get('p99_ms'))} | {m.get('errors', 0)} | {ceiling_text} | {ratio} | "
            f"{target.text if target else '—'} | {met} |"
        )
    total = results.get("total_errors", 0)
    lines.append(f"| errors, all measures | | | | {total} | | | = 0 | {'yes' if total == 0 else '**no**'} |")
    return "\n".join(lines)


def ceilings_table(results: dict[str, Any]) -> str:
    lines = ["| ceiling | req/s | p50 | p99 | errors | how |", "|---|---:|---:|---:|---:|---|"]
    for name in CEILINGS:
        c = results["ceilings"].get(name)
        if c is None:
            continue
        if "seconds_median" in c:
            lines.append(
                f"| {c['label']} | {fmt_rps(c['rps'])} | {c['seconds_median'] * 1000:.1f} ms (median) | | | "
                f"{c['how']}; {fmt_rps(c['parallel_rps'])}/s when {CORES} threads run it at once |"
            )
        else:
            lines.append(
                f"| {c['label']} | {fmt_rps(c['rps'])} | {fmt_ms(c.get('p50_ms'))} | "
                f"{fmt_ms(c.get('p99_ms'))} | {c.get('errors', 0)} | {c['how']} |"
            )
    return "\n".join(lines)


def cpu_table(results: dict[str, Any]) -> str:
    """CPU per request by process group, and the machine's load from others during each run."""
    lines = [
        (
            "| run | demo/hello ms CPU/req | MariaDB ms/req | nginx ms/req | SeaweedFS ms/req | wrk+bench ms/req | "
            "interrupts ms/req | foreign cores |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in [*results["ceilings"].values(), *results["measures"].values()]:
        per, cpu = m.get("cpu_ms_per_request"), m.get("cpu")
        if not per or m.get("probe_requests"):
            continue
        cells = [
            f"{per[key]:.3f}" if key in per else "—"
            for key in ("servers", "mariadb", "nginx", "seaweedfs", "wrk+bench", "interrupts")
        ]
        lines.append(f"| {m['label']} | {' | '.join(cells)} | {cpu['foreign_cores']:.2f} |")
    return "\n".join(lines)


def lb_table(results: dict[str, Any]) -> str | None:
    """The load balancer runs side by side (issue 16, point 6): req/s and CPU per view, the two-host
    run also as a multiple of the one-host run."""
    runs = [(name, results["measures"][name]) for name in LB_MEASURES if name in results["measures"]]
    if not runs:
        return None
    one = results["measures"].get("h5_home_lb_1host")

    def per(m: dict[str, Any], key: str) -> float | None:
        return (m.get("cpu_ms_per_request") or {}).get(key)

    def times(value: float | None, base: float | None) -> str:
        return f"{value / base:.2f}x" if value and base else "—"

    def number(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    lines = [
        (
            "GET /h5/home through the load balancer (the shipped nginx config), every host `--processes=2` on "
            "a loopback address of its own, one MariaDB database. The hosts share this machine's cores with "
            "nginx, MariaDB and wrk, so a second host adds processes, not CPU: req/s cannot double here, and "
            "**CPU per view** is the honest comparison (app = every worker of every host)."
        ),
        "",
        (
            "| run | req/s | vs 1 host | p99 | app ms CPU/view | vs 1 host | nginx ms/view | MariaDB ms/view | "
            f"app cores | machine busy (of {CORES}) | views per host (nginx log) | CPU s per worker | "
            "nginx connections per worker |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for _name, m in runs:
        app, cpu, hosts = per(m, "servers"), m.get("cpu") or {}, len(m.get("hosts", []))
        views = ", ".join(f"{addr}: {n:,}" for addr, n in sorted(m.get("views_per_host", {}).items()))
        cells = [
            f"{hosts} host{'s' if hosts > 1 else ''}",
            fmt_rps(m.get("rps")),
            times(m.get("rps"), one and one.get("rps")),
            fmt_ms(m.get("p99_ms")),
            number(app),
            times(app, one and per(one, "servers")),
            number(per(m, "nginx")),
            number(per(m, "mariadb")),
            f"{cpu.get('servers_cores', 0):.2f}",
            f"{cpu.get('machine_busy_cores', 0):.2f}",
            views or "—",
            " / ".join(f"{x:.1f}" for x in cpu.get("worker_cpu_s", [])),
            " / ".join(map(str, m.get("connections_held", []))) or "—",
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    env, cfg = results.get("environment", {}), results.get("config", {})
    head = (
        f"demo benchmark, {env.get('date')}, {env.get('cores')} cores ({env.get('cpu')}), "
        f"Python {env.get('python')}, Tornado {env.get('tornado')}, {env.get('nginx')}, "
        f"MariaDB {env.get('mariadb', '—')}, wrk -t2 -c{cfg.get('connections')} -d{cfg.get('duration_s')}s"
        f"{', --busy-cpus' if cfg.get('busy_cpus') else ''}"
        f"{', settings ' + str(cfg['settings_overrides']) if cfg.get('settings_overrides') else ''}"
        f"{' (SMOKE: targets not enforced)' if cfg.get('smoke') else ''}"
    )
    out = [head, "", table(results), "", ceilings_table(results), "", cpu_table(results)]
    if results.get("notes"):
        out += ["", *(f"Note: {note}." for note in results["notes"])]
    two = results["measures"].get("healthz_2proc")
    if two:
        split, wall = two["cpu"]["worker_cpu_s"], two["cpu"]["wall_s"]
        versus = f", {two['vs_healthz']:.2f}x GET /healthz on 1 process" if two.get("vs_healthz") else ""
        held = " and ".join(map(str, two.get("connections_held") or [])) or "—"
        out += [
            "",
            (
                f"--processes=2 on one port: the workers held {held} of wrk's {two['connections']} connections "
                f"(halfway) and used {' and '.join(f'{s:.1f}' for s in split)} CPU seconds "
                f"({sum(split) / wall:.2f} cores) in {wall:.0f} s; {fmt_rps(two['rps'])} req/s{versus}."
            ),
        ]
    balanced = lb_table(results)
    if balanced:
        out += ["", balanced]
    loop = results["measures"].get("loop_health")
    if loop:
        load = loop["load"]
        out += [
            "",
            (
                f"Event-loop probe: {loop['probe_requests']} sequential GET /healthz (one every "
                f"{loop['probe_interval_ms']:.0f} ms), max {fmt_ms(loop['max_ms'])}, while "
                f"{fmt_rps(load['login']['rps'])} logins/s and {fmt_rps(load['upload']['rps'])} uploads/s "
                f"(wrk -c{load['login']['connections']} each) ran."
            ),
        ]
    busy = [(c["label"], c["cpu"]["foreign_cores"]) for c in results["ceilings"].values() if c.get("cpu")]
    busy += [(m["label"], m["cpu"]["foreign_cores"]) for m in results["measures"].values() if m.get("cpu")]
    noisy = [f"{label} ({cores:.2f})" for label, cores in busy if cores > 0.2]
    if noisy:
        out += [
            "",
            (
                f"WARNING: foreign CPU (cores used by processes outside this benchmark) during: "
                f"{'; '.join(noisy)}. Those numbers are low; rerun on a quiet machine."
            ),
        ]
    for name, what in (
        ("memory", "uploads"),
        ("memory_animated", "animated GIF uploads, then their thumbnails"),
        ("memory_s3", "uploads to the S3 store"),
    ):
        mem = results["measures"].get(name)
        if mem:
            out += [
                (
                    f"Memory ({name}): VmRSS {mem['rss_before_mib']:.1f} MiB before, VmHWM "
                    f"{mem['peak_rss_mib']:.1f} MiB during {mem['uploads']} concurrent "
                    f"{mem['upload_bytes'] / MIB:.1f} MiB {what}, {mem['rss_after_mib']:.1f} MiB after; "
                    f"statuses {mem['statuses']}."
                )
            ]
    return "\n".join(out)


# -- entry point -------------------------------------------------------------------------------------------


def setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, not minutes: 1 s per measure, 4 connections, 4 memory uploads; "
        "targets are reported, not enforced (errors still fail)",
    )
    parser.add_argument("--duration", type=int, help="seconds per wrk measure (default 10; smoke 1)")
    parser.add_argument("--connections", type=int, help="wrk connections (default 50; smoke 4)")
    parser.add_argument(
        "--json",
        dest="json_path",
        help="where to write the raw results (default bench/results.json; smoke bench/results-smoke.json)",
    )
    parser.add_argument("--only", help=f"comma list of measures/ceilings to run: {', '.join([*CEILINGS, *MEASURES])}")
    parser.add_argument("--memory-uploads", type=int, help="concurrent 8 MiB uploads in the memory test (16)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="run py-spy (raw collapsed stacks, per thread) on the demo process(es) during "
        "each measure; files go to DIR (numbers are then perturbed)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        metavar="SECONDS",
        help="before each measure, wait up to SECONDS (default 30; smoke 0) for other processes "
        "to leave the CPUs alone; the report flags measures that had company anyway",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        type=setting,
        help="a demo setting for the demo processes (DEMO_<NAME>), e.g. --set cpu_workers=1 "
        "--set db_pool_size=4: compare variants, each run against its own ceilings",
    )
    parser.add_argument(
        "--busy-cpus",
        action="store_true",
        help="keep every CPU busy with a nice-19 loop during the run (no idle vCPU to wake up: "
        "see 'Idle CPUs' in bench/README.md)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, media, nginx files)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(MEASURES) - set(CEILINGS) if args.only else set()
    if unknown:
        parser.error(f"--only: unknown name(s) {', '.join(sorted(unknown))}")
    args.duration = args.duration or (1 if args.smoke else 10)
    args.connections = args.connections or (4 if args.smoke else 50)
    args.quiet_wait = (0 if args.smoke else 30) if args.quiet_wait is None else args.quiet_wait
    default_json = "results-smoke.json" if args.smoke else "results.json"
    args.json_path = Path(args.json_path) if args.json_path else BENCH / default_json
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    failed = True
    try:
        bench.run()
        failed = False
    except (TimeoutError, HarnessError, wrk.WrkError, subprocess.CalledProcessError) as error:
        print(f"\nbench: the harness failed: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
    except Exception:  # noqa: BLE001 - a bug or an unexpected answer: still a broken harness (exit 2)
        traceback.print_exc()
        print("\nbench: the harness failed (see the traceback above)", file=sys.stderr)
    finally:
        bench.teardown(failed)
    results = bench.results
    results["seconds"] = round(time.monotonic() - bench.started, 1)
    results.setdefault("environment", {})["load_average_at_end"] = os.getloadavg()
    if failed:
        return 2
    missed = evaluate(results)
    args.json_path.parent.mkdir(parents=True, exist_ok=True)
    args.json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report(results))
    print(f"\nraw results: {args.json_path} ({results['seconds']:.0f} s)")
    if args.smoke:
        broken = [n for n, m in results["measures"].items() if m.get("errors") or not m.get("rps")]
        if broken:
            print(f"smoke: errors or no completed requests in {', '.join(broken)}", file=sys.stderr)
            return 1
        print("smoke: the harness works (targets not enforced)")
        return 0
    if missed:
        print("\nmissed targets:\n" + "\n".join(f"- {m}" for m in missed))
    return 1 if (missed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
