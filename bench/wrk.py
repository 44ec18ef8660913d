"""Run Debian's wrk and read its report: req/s, p50/p99 (``--latency``), non-2xx, socket errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LUA = Path(__file__).resolve().parent / "lua"
WRK = "/usr/bin/wrk"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed something this parser does not understand."""


@dataclass
class WrkResult:
    url: str
    duration: float
    connections: int
    threads: int
    requests: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    non2xx: int = 0  # wrk's "Non-2xx or 3xx responses" (it counts statuses >= 400)
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect, read, write, timeout
    cpu: dict[str, float] = field(default_factory=dict)  # stack.CpuMeter's account of the run
    output: str = ""

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = self.errors
        return data


def wrk_path() -> str:
    path = WRK if os.access(WRK, os.X_OK) else shutil.which("wrk")
    if not path:
        raise WrkError("wrk is not installed (apt-get install wrk)")
    return path


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise WrkError(f"unreadable wrk time {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str, result: WrkResult) -> WrkResult:
    """Fill ``result`` from wrk's text report (wrk 4.x, with --latency)."""
    result.output = output
    done = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", output, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if not done or not rps:
        raise WrkError(f"unexpected wrk output:\n{output}")
    result.requests = int(done.group(1))
    result.rps = float(rps.group(1))
    distribution = output.split("Latency Distribution", 1)
    if len(distribution) == 2:
        for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", distribution[1], re.MULTILINE):
            setattr(result, f"p{pct}_ms", _ms(value))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    result.non2xx = int(non2xx.group(1)) if non2xx else 0
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    names = ("connect", "read", "write", "timeout")
    result.socket_errors = (
        dict(zip(names, map(int, sockets.groups()), strict=True)) if sockets else dict.fromkeys(names, 0)
    )
    return result


def start(
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int = 2,
    script: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> subprocess.Popen:
    """Start ``wrk -t -c -d --latency [-s script] url``; collect it with :func:`finish`."""
    threads = max(1, min(threads, connections))
    duration = max(1, round(duration))  # wrk reads whole seconds only
    command = [
        wrk_path(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        f"--timeout={max(1, round(timeout_s))}s",
    ]
    if script:
        command += ["-s", str(LUA / script)]
    command.append(url)
    environ = {**os.environ, **(env or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ)
    proc.bench_meta = WrkResult(url, duration, connections, threads)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, *, grace: float = 30.0) -> WrkResult:
    """Wait for wrk (its duration plus ``grace``), kill it past that, and parse its report."""
    result: WrkResult = proc.bench_meta  # type: ignore[attr-defined]
    try:
        output, _ = proc.communicate(timeout=result.duration + grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate(timeout=10)
        raise WrkError(f"wrk did not finish within {result.duration + grace:.0f}s:\n{output}") from None
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with {proc.returncode}:\n{output}")
    return parse(output, result)


def run(url: str, **kwargs: Any) -> WrkResult:
    return finish(start(url, **kwargs))
