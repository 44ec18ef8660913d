"""The real process (main.py): migrates before it listens, serves, stops cleanly on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    environ.update(env or {})
    return subprocess.Popen(
        [sys.executable, str(ROOT / "demo" / "main.py"), *args], cwd=tmp_path, env=environ,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return json.load(response)
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


def test_refuses_to_start_in_production_without_cookie_secret(tmp_path):
    proc = start(tmp_path, f"--port={free_port()}", "--log_dir=")
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "DEMO_COOKIE_SECRET" in out


def test_serves_migrated_sqlite_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    db = tmp_path / "fresh.sqlite3"
    proc = start(tmp_path, f"--port={port}", f"--log_dir={tmp_path / 'log'}", env={
        "DEMO_COOKIE_SECRET": "p" * 48, "DEMO_DATABASE_URL": f"sqlite:///{db}",
        "DEMO_MEDIA_ROOT": str(tmp_path / "media"),
    })
    try:
        assert wait_for(f"http://127.0.0.1:{port}/readyz", proc)["checks"] == {"database": "ok"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "stopped" in out
    log_text = (tmp_path / "log" / "demo.log").read_text()
    assert "200 GET /readyz" in log_text


@pytest.mark.parametrize("signum", [signal.SIGINT])
def test_sigint_also_stops_cleanly(tmp_path, signum):
    port = free_port()
    proc = start(tmp_path, f"--port={port}", "--log_dir=", "--debug",
                 f"--database_url=sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
    finally:
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
