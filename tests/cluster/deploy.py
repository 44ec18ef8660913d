"""The whole deployment on its hosts: Galera behind haproxy, SeaweedFS, two app hosts, nginx in front.

    client ─▶ front (nginx :443, the shipped site file) ─▶ app1, app2 :8000 (demo --processes=2)
                                                   app hosts ─▶ dbgw :3306 (haproxy) ─▶ db1, db2, db3
                                 front, app hosts ─▶ s3 :8333 (SeaweedFS)

The order is the operator's (README.md, "Scaling out"): the database cluster and its endpoint, the
store, the schema migrated once by the explicit step, then the app hosts one after the other, then
the front.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from tests.cluster.galera import DB_PASSWORD, DB_USER, Galera, HAProxy
from tests.cluster.net import Network
from tests.helpers import (
    GENEROUS_LIMITS,
    ROOT,
    S3_CREDENTIALS,
    SECRET,
    WEED,
    make_certificate,
    render_shipped_nginx,
    wait_until,
    write_s3_config,
)

HOSTS = {
    "front": 10,
    "app1": 21,
    "app2": 22,
    "s3": 30,
    "dbgw": 40,
    "db1": 41,
    "db2": 42,
    "db3": 43,
    "client": 100,
}
DB_HOSTS = ["db1", "db2", "db3"]
APP_HOSTS = ["app1", "app2"]
APP_PORT = 8000
BUCKET = "demo-cluster"
SERVER_NAME = "localhost"  # what the rendered site file answers to (tests.helpers.render_shipped_nginx)


class Store:
    """``weed mini`` bound to the s3 host's address, on its default ports (the host is its own)."""

    def __init__(self, net: Network, folder: Path) -> None:
        self.net = net
        self.dir = folder / "s3"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = net.address("s3")
        self.endpoint = f"http://{self.address}:8333"

    def start(self) -> None:
        config = write_s3_config(self.dir / "s3.json")
        (self.dir / "data").mkdir(exist_ok=True)
        args = [WEED, "mini", f"-dir={self.dir / 'data'}", f"-ip={self.address}", f"-ip.bind={self.address}"]
        self.net.spawn("s3", [*args, f"-s3.config={config}"], self.dir / "weed.log")

    def kill(self) -> None:
        self.net.kill_host("s3")

    def bucket_made(self) -> bool:
        """Make the bucket (a folder under the filer's /buckets) and see a write land through S3."""
        connection = http.client.HTTPConnection(self.address, 8888, timeout=2)
        try:
            connection.request("POST", f"/buckets/{BUCKET}/", headers={"Content-Length": "0"})
            if connection.getresponse().status not in (200, 201, 409):
                return False
        except OSError:
            return False
        finally:
            connection.close()
        return self.takes_writes()

    def client(self) -> Any:
        from obstore.store import S3Store

        return S3Store(
            BUCKET,
            config={
                "endpoint": self.endpoint,
                "region": "us-east-1",
                "access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            },
            client_options={"allow_http": True, "timeout": "2s", "connect_timeout": "1s"},
        )

    def takes_writes(self) -> bool:
        import obstore
        from obstore.exceptions import BaseError

        try:
            obstore.put(self.client(), "readiness-probe", b"ok")
        except BaseError:
            return False
        return True

    def keys(self, prefix: str) -> list[str]:
        import obstore

        found: list[str] = []
        for batch in obstore.list(self.client(), prefix=prefix):
            found.extend(item["path"] for item in batch)
        return found

    def wait_ready(self, net: Network, timeout: float = 60) -> None:
        net.in_client(wait_until, self.bucket_made, "SeaweedFS to take writes", timeout, 0.2)

    def log(self) -> str:
        path = self.dir / "weed.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


ORPHAN_GRACE = 20  # seconds: see Deployment.app_env


class AppHost:
    """``demo/main.py --processes=2`` on its host, as a unit file would start it."""

    def __init__(self, net: Network, host: str, folder: Path, env: dict[str, str]) -> None:
        self.net, self.host = net, host
        self.dir = folder / host
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = net.address(host)
        self.outbox = self.dir / "outbox.jsonl"
        self.env = {
            **env,
            "DEMO_SMS_BACKEND": f"file:{self.outbox}",
            "DEMO_MEDIA_ROOT": str(self.dir / "media"),
            "DEMO_LOG_DIR": str(self.dir / "log"),
        }
        self.starts = 0
        self.last_ready = ""

    def start(self) -> None:
        self.starts += 1
        args = [
            sys.executable,
            str(ROOT / "demo" / "main.py"),
            f"--address={self.address}",
            f"--port={APP_PORT}",
            "--processes=2",
        ]
        self.net.spawn(self.host, args, self.dir / f"server-{self.starts}.out", env=self.env, cwd=self.dir)

    def stop(self) -> None:
        """SIGTERM to the supervisor, as systemd stops the unit: requests in flight finish."""
        for proc in self.net.procs:
            if self.net.namespace(self.host) in proc.args and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL the parent and both workers at once: a host that loses power."""
        self.net.kill_host(self.host)

    def ready(self) -> bool:
        connection = http.client.HTTPConnection(self.address, APP_PORT, timeout=2)
        try:
            connection.request("GET", "/readyz")
            answer = connection.getresponse()
            self.last_ready = f"{answer.status} {answer.read()[:300]!r}"
            return answer.status == 200
        except OSError as error:
            self.last_ready = repr(error)
            return False
        finally:
            connection.close()

    def wait_ready(self, timeout: float = 60) -> None:
        try:
            self.net.in_client(wait_until, self.ready, f"{self.host} to be ready", timeout, 0.2)
        except AssertionError as error:
            raise AssertionError(f"{error} (last: {self.last_ready})\n{self.output()}") from None

    def output(self) -> str:
        outs = sorted(self.dir.glob("server-*.out"))
        return outs[-1].read_text(errors="replace")[-3000:] if outs else ""


class Front:
    """nginx with demo/conf/nginx/demo.conf as shipped, its upstream listing the app hosts."""

    def __init__(self, net: Network, folder: Path, store_endpoint: str) -> None:
        self.net = net
        self.dir = folder / "front"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = net.address("front")
        self.store_endpoint = store_endpoint
        self.tls = self.dir / "tls"

    def start(self) -> None:
        make_certificate(self.tls)
        # The rendering of tests/helpers.py (the one tests/e2e/test_production.py uses), for placeholder
        # loopback ports, then those ports turned into this host's address and the app hosts': what an
        # operator changes in the file (README.md, "Scaling out"), nothing else.
        https, http_, images, up1, up2 = 18443, 18080, 18008, 18001, 18002
        app1, app2 = (f"{self.net.address(h)}:{APP_PORT}" for h in APP_HOSTS)
        self.conf = render_shipped_nginx(
            self.dir / "nginx",
            self.tls,
            http_,
            https,
            [up1, up2],
            ROOT / "demo" / "static",
            [
                (f"listen 127.0.0.1:{https}", f"listen {self.address}:443"),
                (f"listen 127.0.0.1:{http_}", f"listen {self.address}:80"),
                (f"return 301 https://$host:{https}$request_uri;", "return 301 https://$host$request_uri;"),
                (f"server 127.0.0.1:{up1} ", f"server {app1} "),
                (f"server 127.0.0.1:{up2} ", f"server {app2} "),
            ],
            images_port=images,
            store_endpoint=self.store_endpoint,
        )
        prefix = self.dir / "nginx"
        command = ["/usr/sbin/nginx", "-p", str(prefix), "-c", str(self.conf)]
        directives = f"daemon off; pid {prefix / 'nginx.pid'}; error_log {prefix / 'logs' / 'error.log'} info;"
        checked = self.net.run("front", [*command, "-t", "-g", directives])
        if checked.returncode != 0:
            raise AssertionError(f"nginx -t refused the rendered site file:\n{checked.stderr}")
        self.net.spawn("front", [*command, "-g", directives], self.dir / "nginx.out")

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls / "cert.pem"))

    def answers(self) -> bool:
        try:
            with socket.create_connection((self.address, 443), timeout=2):
                return True
        except OSError:
            return False


class Deployment:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.net = Network(HOSTS)
        self.galera = Galera(self.net, folder, DB_HOSTS)
        self.store = Store(self.net, folder)
        self.timings: dict[str, float] = {}

    def app_env(self) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "AWS_"))}
        return {
            **environ,
            **GENEROUS_LIMITS,  # every client of this test comes from one address (the client host)
            **S3_CREDENTIALS,
            "DEMO_COOKIE_SECRET": SECRET,
            "DEMO_DATABASE_URL": f"mysql+mysqldb://{DB_USER}:{DB_PASSWORD}@{self.net.address('dbgw')}:3306/demo",
            "DEMO_STORAGE": f"s3://{BUCKET}/demo",
            "DEMO_S3_ENDPOINT": self.store.endpoint,
            "DEMO_S3_REGION": "us-east-1",
            # The front's address: its X-Real-IP is believed, anyone else's is not (the clients that
            # address the app hosts directly count as themselves).
            "DEMO_TRUSTED_PROXIES": self.net.address("front"),
            "DEMO_DB_POOL_SIZE": "4",  # 2 hosts x 2 workers x 4 against one node: small machine
            # Housekeeping every few seconds, objects without a row removed once 20 s old (an hour in
            # production): the sweeps run through the failures, and the test sees them finish after.
            "DEMO_HOUSEKEEPING_INTERVAL": "5",
            "DEMO_ORPHAN_GRACE": str(ORPHAN_GRACE),
        }

    def up(self) -> None:
        began = time.monotonic()
        self.net.up()
        self.galera.start()
        self.timings["galera"] = time.monotonic() - began
        self.endpoint = HAProxy(self.net, "dbgw", self.folder, [self.galera.nodes[h].address for h in DB_HOSTS])
        self.endpoint.start()
        self.store.start()
        self.store.wait_ready(self.net)
        self.galera.nodes["db1"].sql("CREATE DATABASE demo CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        wait_until(lambda: self.endpoint.servers().get("db1") == "UP", "haproxy to see db1", 20, 0.2)
        env = self.app_env()
        began = time.monotonic()
        self.migrate(env)
        self.timings["migrate"] = time.monotonic() - began
        self.apps = {h: AppHost(self.net, h, self.folder, env) for h in APP_HOSTS}
        for app in self.apps.values():  # one after the other, as an operator rolls them
            app.start()
            app.wait_ready()
        self.front = Front(self.net, self.folder, self.store.endpoint)
        self.front.start()
        self.net.in_client(wait_until, self.front.answers, "nginx on the front host", 20, 0.1)
        self.timings["up"] = time.monotonic() - began

    def migrate(self, env: dict[str, str]) -> None:
        """The operator's explicit step, once for the deployment, from an app host: Alembic's CLI with
        the servers' settings (demo/migrations/env.py reads them as the server does)."""
        log = self.folder / "migrate.log"
        proc = self.net.spawn(
            "app1",
            [
                sys.executable,
                "-m",
                "alembic",
                "-c",
                str(ROOT / "demo" / "migrations" / "alembic.ini"),
                "upgrade",
                "head",
            ],
            log,
            env=env,
            cwd=ROOT,
        )
        if proc.wait(timeout=120) != 0:
            raise AssertionError(f"migrating failed:\n{log.read_text()}")

    def sql(self, statement: str, node: str = "db2") -> list[list[str]]:
        """Rows of ``statement`` on the demo database, through a node's socket (read after the cluster synced)."""
        out = self.galera.nodes[node].sql(f"USE demo; {statement}", timeout=30)
        return [line.split("\t") for line in out.splitlines() if line]

    def close(self) -> None:
        self.net.close()

    def logged_failed_puts(self) -> set[str]:
        """Object keys the app hosts logged a failed PUT for (``object store error in put``)."""
        found = set()
        for app in self.apps.values():
            for path in (app.dir / "log").glob("demo.log*"):
                for line in path.read_text(errors="replace").splitlines():
                    if "object store error in put" in line and f"/{BUCKET}/" in line:
                        found.add(line.split(f"/{BUCKET}/", 1)[1].split()[0])
        return found

    def logged_orphan_sweeps(self) -> tuple[int, int]:
        """Objects without their row the app hosts' housekeeping logged as removed, and as adopted."""
        removed = adopted = 0
        for app in self.apps.values():
            for path in (app.dir / "log").glob("demo.log*"):
                for line in path.read_text(errors="replace").splitlines():
                    found = re.search(
                        r"objects without their row in \S+: (\d+) removed, (\d+) thumbnails adopted", line
                    )
                    if found:
                        removed, adopted = removed + int(found.group(1)), adopted + int(found.group(2))
        return removed, adopted

    def logs(self) -> str:
        parts = [f"--- haproxy ---\n{self.endpoint.log()}" if hasattr(self, "endpoint") else ""]
        for host, node in self.galera.nodes.items():
            parts.append(f"--- {host} ---\n{node.tail(1500)}")
        for host, app in getattr(self, "apps", {}).items():
            parts.append(f"--- {host} ---\n{app.output()}")
        parts.append(f"--- s3 ---\n{self.store.log()[-1500:]}")
        return "\n".join(parts)
