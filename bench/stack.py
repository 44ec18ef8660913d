"""The processes a benchmark run starts: the bench database, demo servers, hello world (nginx is
tests/helpers.py's ``Nginx``, which the production tests run too).

Every process writes to a file (never to a pipe nobody reads), every wait is bounded, and every
``stop`` ends only the process this module started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from tests.helpers import (
    HarnessError,
    HttpClient,
    ThrowawayDatabase,
    free_port,
    memory,
    mysql_unreachable_reason,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO_MAIN = ROOT / "demo" / "main.py"
HELLO = Path(__file__).resolve().parent / "hello.py"
MYSQL_SERVER = os.environ.get(
    "BENCH_MYSQL_URL", os.environ.get("DEMO_TEST_MYSQL_URL", "mysql+mysqldb://root@127.0.0.1:3306")
)
START_TIMEOUT = 60  # seconds for a server to answer (a fresh database is migrated first)
STOP_TIMEOUT = 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# -- /proc -----------------------------------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    return memory(pid, key) // 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)


def wait_idle(pids: list[int], timeout: float = 20.0, below: float = 0.05) -> float:
    """Wait until ``pids`` together use less than ``below`` of a core over 0.25 s (leftover work
    of the previous measure, e.g. uploads wrk abandoned when its time was up, must not count
    against the next one); returns the seconds waited (== timeout when they never calmed down)."""
    started = time.monotonic()
    quiet = 0
    previous = sum(cpu_seconds(pid) for pid in pids)
    while time.monotonic() - started < timeout:
        time.sleep(0.25)
        now = sum(cpu_seconds(pid) for pid in pids)
        quiet = quiet + 1 if (now - previous) / 0.25 < below else 0
        previous = now
        if quiet >= 2:
            break
    return time.monotonic() - started


def _machine_jiffies() -> tuple[int, int, int]:
    """(process time, interrupt time, steal) jiffies of all CPUs since boot, from /proc/stat.
    Interrupt time is mostly loopback networking (softirq), charged to no process."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system, irq + softirq, steal


def find_pids(comm: str) -> list[int]:
    """Processes named ``comm`` (read-only use: CPU accounting of the shared MariaDB server)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class CpuMeter:
    """Where the machine's CPU went during one measure, in cores (CPU seconds / wall seconds):
    the servers under test, nginx, MariaDB (shared: other users' queries count here too), wrk and
    this harness - and everything else ("foreign"), which makes a number low and a ratio unreliable.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.groups.setdefault("mariadb", find_pids("mariadbd"))

    @staticmethod
    def _cpu(pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            # A worker that exited: its last share is lost, not double-counted.
            with contextlib.suppress(OSError, IndexError):
                total += cpu_seconds(pid)
        return total

    @staticmethod
    def _children_and_self() -> float:
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime  # wrk (once reaped) and us

    def __enter__(self) -> Self:
        self.wall = time.monotonic()
        self.machine = _machine_jiffies()
        self.before = {name: self._cpu(pids) for name, pids in self.groups.items()}
        self.local = self._children_and_self()
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.monotonic() - self.wall
        processes, interrupts, steal = (b - a for a, b in zip(self.machine, _machine_jiffies(), strict=True))
        used = {name: self._cpu(pids) - self.before[name] for name, pids in self.groups.items()}
        used["wrk+bench"] = self._children_and_self() - self.local
        ours = sum(used.values())
        self.result = {
            "wall_s": wall,
            "machine_busy_cores": (processes + interrupts + steal) / CLK_TCK / wall,
            **{f"{name}_cores": seconds / wall for name, seconds in used.items()},
            "interrupts_cores": interrupts / CLK_TCK / wall,
            "steal_cores": steal / CLK_TCK / wall,
            "foreign_cores": max(0.0, processes / CLK_TCK - ours) / wall,
        }


# -- processes -------------------------------------------------------------------------------------


def free_port_on(address: str) -> int:
    """A port free on ``address`` (another loopback address than 127.0.0.1: a "host" of the load
    balancer measures; the whole 127.0.0.0/8 is on ``lo``)."""
    if address == "127.0.0.1":
        return free_port()
    with socket.socket() as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


def forked_workers(pid: int, count: int, timeout: float = 30) -> list[int]:
    """The ``count`` workers a ``--processes`` supervisor forked (its children, once all are there)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    wait_until(
        lambda: len(children.read_text().split()) == count,
        f"{count} workers of process {pid}",
        timeout=timeout,
        every=0.1,
        error=HarnessError,
    )
    return [int(child) for child in children.read_text().split()]


class Server:
    """One server process on <address>:<port> (127.0.0.1 unless told), output to ``<tmp>/<name>.out``."""

    ready_path = "/healthz"

    def __init__(self, name: str, tmp: Path, port: int | None = None, address: str = "127.0.0.1") -> None:
        self.name = name
        self.tmp = tmp
        self.address = address
        self.port = port or free_port_on(address)
        self.output = tmp / f"{name}.out"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "PROMETHEUS_"))}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self) -> Server:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.tmp,
                env=self.environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Server:
        def ready() -> bool:
            if not self.running():
                raise HarnessError(f"{self.name} exited early (status {self.proc.returncode}):\n{self.logs()}")
            try:
                return HttpClient(self.url, timeout=2).get(self.ready_path).code == 200
            except OSError:
                return False

        wait_until(ready, f"{self.name} on port {self.port} to answer", timeout, every=0.1, error=HarnessError)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def logs(self, chars: int = 4000) -> str:
        return f"--- {self.output} ---\n{tail(self.output, chars)}"


class HelloServer(Server):
    def command(self) -> list[str]:
        return [sys.executable, str(HELLO), str(self.port)]

    ready_path = "/"


class DemoServer(Server):
    """``demo/main.py`` as demo@<port>.service runs it: one process (unless ``DEMO_PROCESSES`` in
    ``env`` says more), on loopback, its own log folder."""

    def __init__(
        self, name: str, tmp: Path, env: dict[str, str], port: int | None = None, address: str = "127.0.0.1"
    ) -> None:
        super().__init__(name, tmp, port, address)
        self.env = env
        self.log_dir = tmp / "log" / name

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(DEMO_MAIN),
            f"--port={self.port}",
            f"--address={self.address}",
            f"--log_dir={self.log_dir}",
        ]

    def environment(self) -> dict[str, str]:
        return {**super().environment(), **self.env}

    def logs(self, chars: int = 4000) -> str:
        text = super().logs(chars)
        log = self.log_dir / "demo.log"
        if log.exists():
            text += f"\n--- {log} ---\n{tail(log, chars)}"
        return text


# -- the database ----------------------------------------------------------------------------------


class BenchDatabase(ThrowawayDatabase):
    """A fresh ``demo_bench_<random>`` database on the MariaDB server; dropped by ``drop``."""

    def __init__(self, server_url: str = MYSQL_SERVER) -> None:
        super().__init__(server_url, "demo_bench")

    def create(self) -> BenchDatabase:
        reason = mysql_unreachable_reason(self.server_url, timeout=5)
        if reason:
            raise HarnessError(f"{reason} (make installs mysqlclient when libmariadb-dev is present)")
        return super().create()

    def version(self) -> str:
        return str(self.scalar("SELECT VERSION()"))


# -- nginx with the shipped site file --------------------------------------------------------------
