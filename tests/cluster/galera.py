"""A three-node MariaDB Galera cluster from Debian's packages, and haproxy in front of it.

Each node is ``mariadbd`` as the ``mysql`` user (the rsync state transfer refuses to run as root) on
its own host, with a small memory footprint (the CI machine has two cores and a few GB). The first
node bootstraps the cluster (``--wsrep-new-cluster``) on a datadir made by ``mariadb-install-db``;
the others start on empty datadirs and receive a full copy (SST, rsync) from a donor, one after the
other (Galera accepts one joiner's state transfer at a time per donor). A node killed and started
again finds its position in its datadir and catches up from the others' write-set cache (IST), or
takes a full copy when it cannot.

haproxy runs ``demo/conf/haproxy/demo-db.cfg`` as shipped, with only the addresses and the paths of
this run put in, and its health check is the shipped ``galera-check``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from tests.cluster.net import Network
from tests.helpers import ROOT, wait_until

GALERA = "/usr/lib/galera/libgalera_smm.so"
MARIADBD = "/usr/sbin/mariadbd"
HAPROXY = "/usr/sbin/haproxy"
HAPROXY_SAMPLE = ROOT / "demo" / "conf" / "haproxy" / "demo-db.cfg"
GALERA_CHECK = ROOT / "demo" / "conf" / "haproxy" / "galera-check"
DB_USER, DB_PASSWORD = "demo", "demo-cluster-pw"
# The user haproxy's check (galera-check) logs in as (no password, no privileges), from the sample.
CHECK_USER = "haproxy_check"


def missing() -> str | None:
    for path, package in ((GALERA, "galera-4"), (MARIADBD, "mariadb-server"), (HAPROXY, "haproxy")):
        if not os.access(path, os.R_OK):
            return f"{path} is missing (apt-get install {package})"
    if shutil.which("rsync") is None:
        return "rsync is missing (apt-get install rsync): Galera's state transfer uses it"
    return None


EVS_TIMEOUTS = (
    "evs.inactive_check_period=PT0.5S; evs.suspect_timeout=PT3S; evs.inactive_timeout=PT6S; evs.keepalive_period=PT0.5S"
)


class GaleraNode:
    def __init__(self, net: Network, host: str, folder: Path, peers: list[str]) -> None:
        self.net, self.host = net, host
        self.dir = folder / host
        self.datadir = self.dir / "data"
        self.address = net.address(host)
        self.peers = peers
        self.log = self.dir / "mariadbd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> Path:
        path = self.dir / "my.cnf"
        path.write_text(
            f"""[mariadbd]
datadir = {self.datadir}
socket = {self.dir}/mysqld.sock
pid-file = {self.dir}/mysqld.pid
bind-address = {self.address}
port = 3306
skip-name-resolve
log-error = {self.log}
# Small: three nodes, two app hosts and the store share two cores and a few GB here.
innodb-buffer-pool-size = 32M
innodb-log-file-size = 48M
key-buffer-size = 1M
performance-schema = OFF
max-connections = 200
# What Galera needs (MariaDB's Galera guide): row events, interleaved auto-increment locks.
binlog-format = ROW
default-storage-engine = InnoDB
innodb-autoinc-lock-mode = 2
innodb-flush-log-at-trx-commit = 0
wsrep-on = ON
wsrep-provider = {GALERA}
wsrep-cluster-name = demo
wsrep-cluster-address = gcomm://{",".join(self.peers)}
wsrep-node-address = {self.address}
wsrep-node-name = {self.host}
wsrep-sst-method = rsync
# gcache keeps the write-sets a node that was down for a while needs (IST instead of a full copy);
# the evs timeouts let the others drop a silent node within seconds (the defaults are 5 and 15 s).
wsrep-provider-options = "gcache.size=64M; {EVS_TIMEOUTS}"
"""
        )
        return path

    def install(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.datadir.mkdir(exist_ok=True)
        shutil.chown(self.dir, "mysql", "mysql")
        shutil.chown(self.datadir, "mysql", "mysql")

    def bootstrap_datadir(self) -> None:
        done = subprocess.run(
            [
                "mariadb-install-db",
                f"--defaults-file={self.config()}",
                "--user=mysql",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{done.stdout}\n{done.stderr}")

    def start(self, *, new_cluster: bool = False, donor: str | None = None) -> None:
        args = [MARIADBD, f"--defaults-file={self.config()}"]
        if new_cluster:
            args.append("--wsrep-new-cluster")
        if donor:
            args.append(f"--wsrep-sst-donor={donor}")
        self.proc = self.net.spawn(self.host, args, self.dir / "stdout.log", user="mysql")

    def sql(self, statement: str, timeout: float = 10) -> str:
        """A statement through the node's socket as root (socket authentication), its output as text."""
        done = subprocess.run(
            ["mariadb", f"--socket={self.dir}/mysqld.sock", "-uroot", "-N", "-B", "-e", statement],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.host}: {statement}: {done.stderr.strip()}")
        return done.stdout.strip()

    def status(self, name: str) -> str:
        try:
            line = self.sql(f"SHOW GLOBAL STATUS LIKE '{name}'", timeout=3)
        except (RuntimeError, subprocess.TimeoutExpired):
            return ""
        return line.split("\t")[1] if "\t" in line else ""

    def synced(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.host}'s mariadbd exited:\n{self.tail()}")
        return self.status("wsrep_local_state_comment") == "Synced" and self.status("wsrep_ready") == "ON"

    def wait_synced(self, timeout: float = 60) -> None:
        try:
            wait_until(self.synced, f"{self.host} to be Synced", timeout=timeout, every=0.2)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL mariadbd: the node drops out with no goodbye, as on a power cut."""
        for pid in self.net.pids(self.host):
            os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def signal(self, number: signal.Signals) -> None:
        for pid in self.net.pids(self.host):
            os.kill(pid, number)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def transfer(self) -> str:
        """How the node last joined: 'IST' or 'SST' (from its error log)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        joins = re.findall(r"(Prepared IST receiver|Running: 'wsrep_sst_rsync --role 'joiner')", text)
        if not joins:
            return "?"
        return "IST" if joins[-1].startswith("Prepared IST") else "SST"


class Galera:
    """db1..db3 on their hosts; ``start`` bootstraps and joins them one after another."""

    def __init__(self, net: Network, folder: Path, hosts: list[str]) -> None:
        peers = [net.address(h) for h in hosts]
        self.nodes = {h: GaleraNode(net, h, folder, peers) for h in hosts}

    def start(self) -> None:
        first, *others = self.nodes.values()
        for node in self.nodes.values():
            node.install()
        first.bootstrap_datadir()
        first.start(new_cluster=True)
        first.wait_synced()
        # Users: the app's (replicated with the cluster's DDL to every node) and haproxy's check.
        first.sql(
            f"CREATE USER '{DB_USER}'@'%' IDENTIFIED BY '{DB_PASSWORD}';"
            f"GRANT ALL ON *.* TO '{DB_USER}'@'%';"
            f"CREATE USER '{CHECK_USER}'@'%';"
        )
        for node in others:
            node.start()
            node.wait_synced()

    def url(self, host: str, database: str = "demo") -> str:
        return f"mysql+mysqldb://{DB_USER}:{DB_PASSWORD}@{self.nodes[host].address}:3306/{database}"


def render_haproxy(folder: Path, listen: str, nodes: list[str]) -> Path:
    """The shipped sample with this run's addresses, stats socket and check path; nothing else changes."""
    text = HAPROXY_SAMPLE.read_text()
    replacements = [
        ("10.0.0.10:3306", f"{listen}:3306"),
        ("/run/haproxy/demo-db.sock", str(folder / "stats.sock")),
        ("/etc/haproxy/galera-check", str(GALERA_CHECK)),  # the shipped script, where it lies
    ]
    for number, address in enumerate(nodes, 1):
        replacements.append((f"10.0.0.{10 + number}:3306", f"{address}:3306"))
    for old, new in replacements:
        if old not in text:
            raise AssertionError(f"{old!r} is no longer in {HAPROXY_SAMPLE}: update tests/cluster/galera.py")
        text = text.replace(old, new)
    if f"--user={CHECK_USER}" not in GALERA_CHECK.read_text():
        raise AssertionError(f"{GALERA_CHECK} no longer logs in as {CHECK_USER}: update tests/cluster/galera.py")
    path = folder / "haproxy.cfg"
    path.write_text(text)
    return path


class HAProxy:
    def __init__(self, net: Network, host: str, folder: Path, nodes: list[str]) -> None:
        self.net, self.host = net, host
        self.dir = folder / host
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = render_haproxy(self.dir, net.address(host), nodes)
        self.address = net.address(host)

    def start(self) -> None:
        checked = subprocess.run([HAPROXY, "-c", "-f", str(self.conf)], capture_output=True, text=True, check=False)
        if checked.returncode != 0:
            raise AssertionError(f"haproxy -c refused the rendered sample:\n{checked.stdout}\n{checked.stderr}")
        self.proc = self.net.spawn(self.host, [HAPROXY, "-db", "-f", str(self.conf)], self.dir / "haproxy.log")

    def servers(self) -> dict[str, str]:
        """Each server's state as haproxy sees it (UP, DOWN, ...), from the stats socket."""
        sock = self.dir / "stats.sock"
        done = subprocess.run(
            ["socat", "-", f"UNIX-CONNECT:{sock}"], input="show stat\n", capture_output=True, text=True, check=False
        )
        states = {}
        for line in done.stdout.splitlines():
            cells = line.split(",")
            if len(cells) > 17 and cells[0] == "galera" and cells[1] not in ("FRONTEND", "BACKEND"):
                states[cells[1]] = cells[17]
        return states

    def log(self) -> str:
        path = self.dir / "haproxy.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
