"""Hosts as Linux network namespaces on one bridge, and the processes that run on them.

Every host is a namespace ``demo-cluster-<pid>-<host>`` with one veth whose far end is plugged into a
bridge ``dcb<pid>`` in the root namespace. The bridge has no address: the hosts' addresses
(10.77.0.0/24) exist only inside their namespaces, so nothing of the machine's own network changes,
and two runs at once (or a crashed one) do not collide: every name carries the pid of the pytest
process that made it, and ``clean_stale`` removes what a dead pid left behind.

The test process itself talks to the hosts from a ``client`` host: ``Network.client_pool`` gives
threads that moved into that namespace (setns(2) is per thread), so the rest of pytest stays where
it was.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

SUBNET = "10.77.0"
NAMESPACE_PREFIX = "demo-cluster-"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def missing() -> str | None:
    """Why hosts cannot be made here (no root, no `ip netns`), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{NAMESPACE_PREFIX}probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_namespace_processes(namespace: str) -> None:
    """SIGKILL every process in ``namespace`` (each started by this harness), one pid at a time."""
    for _ in range(20):
        pids = [int(p) for p in ip("netns", "pids", namespace, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)  # a stopped (frozen) process dies only once it runs
        time.sleep(0.1)


def clean_stale() -> None:
    """Remove the namespaces and links of earlier runs whose pytest process is gone."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        found = re.match(rf"{NAMESPACE_PREFIX}(?:probe-)?(\d+)", name)
        if found and not _alive(int(found.group(1))):
            kill_namespace_processes(name)
            ip("netns", "del", name, check=False)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        found = re.match(r"\d+: (dcb?)(\d+)([a-z0-9]*)[@:]", line)
        if found and not _alive(int(found.group(2))):
            ip("link", "del", f"{found.group(1)}{found.group(2)}{found.group(3)}", check=False)


class Network:
    """The bridge and the hosts; ``close`` removes everything, whatever state it is in."""

    def __init__(self, hosts: dict[str, int]) -> None:
        """``hosts``: name (at most 6 characters) -> last byte of its address."""
        self.tag = str(os.getpid())
        self.bridge = f"dcb{self.tag}"
        self.hosts = dict(hosts)
        self.procs: list[subprocess.Popen[bytes]] = []

    def namespace(self, host: str) -> str:
        return f"{NAMESPACE_PREFIX}{self.tag}-{host}"

    def veth(self, host: str) -> str:
        """The root-namespace end of ``host``'s cable: ``ip link set <it> down`` cuts the host off."""
        return f"dc{self.tag}{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts[host]}"

    def up(self) -> Network:
        clean_stale()
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            ns = self.namespace(host)
            ip("netns", "add", ns)
            ip("link", "add", self.veth(host), "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", self.veth(host), "master", self.bridge, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        return self

    def cut(self, host: str) -> None:
        ip("link", "set", self.veth(host), "down")

    def mend(self, host: str) -> None:
        ip("link", "set", self.veth(host), "up")

    def spawn(
        self,
        host: str,
        args: list[str],
        log: Path,
        *,
        user: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """``args`` on ``host`` (as ``user``), output appended to ``log``; its own process group."""
        command = ["ip", "netns", "exec", self.namespace(host)]
        if user:
            command += ["runuser", "-u", user, "--"]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*command, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def run(self, host: str, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace(host), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def pids(self, host: str) -> list[int]:
        return [int(p) for p in ip("netns", "pids", self.namespace(host), check=False).stdout.split()]

    def kill_host(self, host: str) -> None:
        """SIGKILL everything running on ``host``: what a machine that loses power does to its processes."""
        kill_namespace_processes(self.namespace(host))

    def client_pool(self, threads: int) -> ThreadPoolExecutor:
        """Threads living in the ``client`` host for good (they are thrown away with the pool)."""
        path = f"/run/netns/{self.namespace('client')}"

        def enter() -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)

        return ThreadPoolExecutor(threads, thread_name_prefix="client", initializer=enter)

    def in_client(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` run from the ``client`` host (a thread of its own, then back)."""
        with self.client_pool(1) as pool:
            return pool.submit(fn, *args, **kw).result()

    def close(self) -> None:
        for host in self.hosts:
            kill_namespace_processes(self.namespace(host))
        for proc in self.procs:
            with suppress(Exception):
                proc.wait(timeout=5)
        for host in self.hosts:
            ip("link", "del", self.veth(host), check=False)
            ip("netns", "del", self.namespace(host), check=False)
        ip("link", "del", self.bridge, check=False)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")
