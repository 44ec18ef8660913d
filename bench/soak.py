"""`make soak`: the benchmark workload, mixed, against one demo process on MariaDB for 10 minutes.

Passes when no request got a 5xx (nor a socket error) and, after a warm-up, the server's RSS and its
count of open file descriptors stay flat (less than 10 % growth from the first sample after warm-up
to the highest one after it). Not part of CI: it takes minutes by design.

    .venv/bin/python bench/soak.py [--minutes 10] [--warmup 2] [--json bench/results-soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run, wrk  # noqa: E402  (after the sys.path line above)
from bench.stack import BenchDatabase, proc_status_kib  # noqa: E402

ROUND_SECONDS = 30  # wrk runs in rounds, so a round's errors are attributed and counted as they come
SAMPLE_EVERY = 5.0
# (name, path, Lua script, connections): the benchmark's requests, all at once.
MIX = [
    ("healthz", "/healthz", None, 4),
    ("h5_home", "/h5/home", "cookie.lua", 12),
    ("login", "/users/login", "login.lua", 4),
    ("upload", "/images", "upload.lua", 4),
    ("image", "/images/{image}.jpg", None, 12),
    ("thumbnail", "/images/{image}.jpg?w=320", None, 4),
]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes before RSS and fds must be flat")
    parser.add_argument("--json", default=str(BENCH / "results-soak.json"))
    args = parser.parse_args(argv)

    # Access lines for 2xx/4xx would fill the log; 5xx are logged at ERROR, so "warning" keeps them.
    bench = run.Bench(run.parse_args(["--duration", "1", "--set", "log_level=warning"]))
    samples: list[tuple[float, int, int]] = []
    totals: dict[str, dict[str, int]] = {name: {"requests": 0, "non2xx": 0, "socket_errors": 0} for name, *_ in MIX}
    try:
        bench.make_images()
        bench.db = BenchDatabase().create()
        server = bench.start(bench.demo("soak"))
        client = run.Http(server.url)
        bench.set_up_users(client)
        stop = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - started, proc_status_kib(server.pid, "VmRSS"), open_fds(server.pid)))
                stop.wait(SAMPLE_EVERY)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = started + args.minutes * 60
        while time.monotonic() < deadline:
            seconds = max(1, min(ROUND_SECONDS, round(deadline - time.monotonic())))
            procs = [
                (
                    name,
                    wrk.start(
                        server.url + path.format(image=bench.image_id),
                        duration=seconds,
                        connections=conns,
                        script=script,
                        env=bench.lua_env(script),
                        timeout_s=30,
                    ),
                )
                for name, path, script, conns in MIX
            ]
            for name, proc in procs:
                result = wrk.finish(proc)
                totals[name]["requests"] += result.requests
                totals[name]["non2xx"] += result.non2xx
                totals[name]["socket_errors"] += sum(result.socket_errors.values())
            bench.log(
                f"soak: {time.monotonic() - started:5.0f}s, RSS {samples[-1][1] / 1024:.1f} MiB, "
                f"fds {samples[-1][2]}, errors {sum(t['non2xx'] + t['socket_errors'] for t in totals.values())}"
            )
        stop.set()
        sampler.join()
        server_errors = sum(1 for line in server.logs(10**8).splitlines() if " demo.access: 5" in line)
    finally:
        bench.teardown(failed=False)

    warm = [s for s in samples if s[0] >= args.warmup * 60] or samples
    rss_growth = max(s[1] for s in warm) / warm[0][1] - 1
    fd_growth = max(s[2] for s in warm) / warm[0][2] - 1
    errors = sum(t["non2xx"] + t["socket_errors"] for t in totals.values())
    report = {
        "minutes": args.minutes,
        "warmup_minutes": args.warmup,
        "requests": totals,
        "errors": errors,
        "server_5xx_lines": server_errors,
        "rss_mib": {
            "after_warmup": warm[0][1] / 1024,
            "max_after_warmup": max(s[1] for s in warm) / 1024,
            "growth": rss_growth,
        },
        "open_fds": {"after_warmup": warm[0][2], "max_after_warmup": max(s[2] for s in warm), "growth": fd_growth},
        "samples": samples,
    }
    Path(args.json).write_text(json.dumps(report, indent=1))
    ok = errors == 0 and server_errors == 0 and rss_growth < 0.10 and fd_growth < 0.10
    print(
        f"soak {args.minutes:g} min: {sum(t['requests'] for t in totals.values())} requests, {errors} errors "
        f"(non-2xx or socket), {server_errors} 5xx in the server log; after {args.warmup:g} min warm-up RSS "
        f"{warm[0][1] / 1024:.1f} -> max {max(s[1] for s in warm) / 1024:.1f} MiB ({rss_growth:+.1%}), open fds "
        f"{warm[0][2]} -> max {max(s[2] for s in warm)} ({fd_growth:+.1%}): {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
