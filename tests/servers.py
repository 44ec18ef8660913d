"""Real server processes for the tests that need one (signals, crashes, several workers, faults).

Output goes to a file, never to a pipe nobody reads (a full pipe would stall the server).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECRET = "p" * 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: Path, *args: str, env: dict[str, str] | None = None,
          command: list[str] | None = None) -> subprocess.Popen:
    """``python demo/main.py ARGS`` (or ``command ARGS``) with only the DEMO_* variables given in ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    environ.update(env or {})
    output = open(workdir / f"server-{time.monotonic_ns()}.out", "w+")
    program = command or [sys.executable, str(ROOT / "demo" / "main.py")]
    proc = subprocess.Popen([*program, *args], cwd=workdir, env=environ,
                            stdout=output, stderr=subprocess.STDOUT, text=True)
    proc.output_file = output  # type: ignore[attr-defined]
    return proc


def output_of(proc: subprocess.Popen) -> str:
    return Path(proc.output_file.name).read_text()  # type: ignore[attr-defined]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 20) -> dict:
    """Poll ``url`` until it answers 200 (JSON body returned); fail if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{output_of(proc)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return json.load(response)
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.05)
    raise AssertionError(f"server did not come up:\n{output_of(proc)}")


def finish(proc: subprocess.Popen, timeout: float = 30) -> str:
    """Wait for the process to exit and return what it printed; on a hang, kill it and fail."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()
        raise AssertionError("process did not stop:\n" + output_of(proc)) from None
    finally:
        if proc.returncode is not None:
            proc.output_file.close()  # type: ignore[attr-defined]
    return output_of(proc)


def stop(proc: subprocess.Popen, timeout: float = 30) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return finish(proc, timeout)


def call(port: int, method: str, path: str, payload: Any = None, *, token: str | None = None,
         body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, Any]:
    """One request to a local server: (status, parsed JSON or raw bytes). Never raises on 4xx/5xx."""
    headers = dict(headers or {})
    if payload is not None:
        body = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def register(port: int, phone: str, code: str, password: str = "demo123456") -> str:
    """Register ``phone`` (a test number with a fixed ``code``) and return its token."""
    status, _ = call(port, "POST", "/users/code", {"phone": phone})
    assert status == 200, status
    status, body = call(port, "POST", "/users/regist", {"phone": phone, "password": password, "code": code})
    assert status == 201, body
    return body["token"]



def memory(pid: int, key: str) -> int:
    """A process's ``VmRSS`` (resident now) or ``VmHWM`` (its peak) in bytes: C memory (Pillow's) too."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for process {pid}")


def reset_peak_memory(pid: int) -> None:
    """Make VmHWM the current RSS again (Linux >= 4.0), so a later peak is not hidden by an earlier one."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
