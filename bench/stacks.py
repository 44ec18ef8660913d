"""Summarise py-spy's raw (collapsed) stacks: where each thread's CPU went.

``python bench/stacks.py FILE...`` (files from ``bench/run.py --profile DIR``). Two kinds of file:
``*.gil.txt`` holds only samples of the thread that held the GIL (where the Python CPU went: every
pool thread running Python code competes with the event loop for it); ``*.threads.txt`` holds every
thread py-spy did not see idle - with ``--nonblocking`` a thread waiting inside a C call (MySQLdb's
query, epoll) usually still counts, so read it as "where each thread spends its time".
Prints, per file: samples per thread pool (event loop, demo-db, demo-cpu, demo-io), then the top
categories (SQLAlchemy, MySQLdb, templates, logging, ...) and the top leaf frames per pool.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")

# First match wins, checked from the leaf frame upwards: the innermost recognisable layer.
CATEGORIES = [
    ("argon2 (hash)", ("argon2/",)),
    ("Pillow (decode/encode)", ("PIL/",)),
    ("hashlib / file sha256", ("hashlib", "file_sha256 (")),  # demo/common/images/imaging.py
    ("MySQLdb (driver)", ("MySQLdb/",)),
    ("SQLAlchemy", ("sqlalchemy/",)),
    ("template render", ("tornado/template.py", ".generated.py")),
    ("logging (request log)", ("logging/", "demo/common/infra/logs.py")),
    ("prometheus metrics", ("prometheus_client/",)),
    ("python-multipart", ("python_multipart/", "multipart/")),
    (
        "tornado HTTP (parse/write)",
        (
            "tornado/http1connection.py",
            "tornado/httputil.py",
            "tornado/iostream.py",
            "tornado/httpserver.py",
            "tornado/routing.py",
        ),
    ),
    ("tornado web (handler)", ("tornado/web.py", "tornado/escape.py")),
    (
        "thread pool hop (futures, queue, locks)",
        (
            "concurrent/futures/",
            "threading.py",
            "queue.py",
            "asyncio/futures.py",
            "run_in_executor (",  # a frame reads "func (file:line)"
        ),
    ),
    ("asyncio loop", ("asyncio/", "selectors.py")),
    ("json", ("json/",)),
    ("demo code", ("demo/",)),
]


def pool_of(thread: str) -> str:
    name = thread.split(": ", 1)[-1]
    if name.startswith("MainThread"):
        return "event loop (MainThread)"
    match = re.match(r"(demo-[a-z]+)", name)
    return match.group(1) if match else name


def category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def load(path: Path) -> list[tuple[str, list[str], int]]:
    samples = []
    for line in path.read_text(errors="replace").splitlines():
        match = LINE.match(line)
        if not match:
            continue
        thread, *frames = match.group("stack").split(";")
        samples.append((thread, frames, int(match.group("count"))))
    return samples


def summarise(path: Path, top: int = 12) -> str:
    samples = load(path)
    total = sum(c for _, _, c in samples) or 1
    per_pool: Counter[str] = Counter()
    categories: dict[str, Counter[str]] = defaultdict(Counter)
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    for thread, frames, count in samples:
        seen = set()
        for frame in frames:
            match = FRAME.match(frame)
            if match and match.group("file").startswith(("demo/", "tornado/web.py")):
                seen.add(f"{match.group('func')} ({match.group('file')})")
        for frame in seen:
            inclusive[pool_of(thread)][frame] += count
        pool = pool_of(thread)
        per_pool[pool] += count
        categories[pool][category(frames)] += count
        leaf = FRAME.match(frames[-1]) if frames else None
        leaves[pool][f"{leaf.group('func')} ({leaf.group('file')})" if leaf else (frames[-1] if frames else "?")] += (
            count
        )
    out = [f"== {path.name}: {total} samples"]
    for pool, count in per_pool.most_common():
        out.append(f"\n-- {pool}: {count / total:.0%} of samples")
        out.append(
            "   by layer: " + ", ".join(f"{name} {n / count:.0%}" for name, n in categories[pool].most_common(8))
        )
        out.append("   leaf frames:")
        for leaf, n in leaves[pool].most_common(top if pool.startswith("event loop") else 5):
            out.append(f"   {n / count:5.1%}  {leaf}")
        if pool.startswith("event loop"):
            out.append("   inclusive (demo code and Tornado's request handling, below the loop's own frames):")
            for frame, n in inclusive[pool].most_common():
                if n / count < 0.03 or n / count > 0.9:
                    continue
                out.append(f"   {n / count:5.1%}  {frame}")
    return "\n".join(out)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarise(Path(arg)))
        print()
