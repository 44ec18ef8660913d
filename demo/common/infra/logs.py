"""Logging: a rotating file in demo/log/ plus stderr, and the one-line request log.

The request log never prints secrets: the query string is logged with the values of sensitive
parameters replaced, and bodies and headers are never logged.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

SENSITIVE_PARAMS = {"token", "code", "ticket", "password", "access_token", "_xsrf"}
FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
access_log = logging.getLogger("demo.access")


_outputs: list[logging.Handler] = []  # where lines end up: stderr and the file
_writer: logging.handlers.QueueListener | None = None


def setup_logging(log_dir: str, level: str = "info", *, self_rotating: bool = True) -> None:
    """stderr plus ``log_dir/demo.log``. One process rotates its own file; several share it and
    leave rotation to logrotate, reopening the file on SIGHUP (see ``reopen_logs``).

    Writing happens on a thread of its own: the event loop only queues a line, so a slow disk or a
    blocked stderr pipe never stalls requests."""
    logging.getLogger().setLevel(level.upper())
    formatter = logging.Formatter(FORMAT)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    outputs: list[logging.Handler] = [stderr]
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = os.path.join(log_dir, "demo.log")
        if self_rotating:
            to_file: logging.FileHandler = logging.handlers.RotatingFileHandler(
                path, maxBytes=20 * 1024 * 1024, backupCount=10, encoding="utf-8"
            )
        else:
            to_file = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        to_file.setFormatter(formatter)
        outputs.append(to_file)
    _outputs[:] = outputs
    _start_writer()
    logging.getLogger("tornado.access").setLevel(logging.WARNING)  # ours replaces it


def _start_writer() -> None:
    global _writer
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(lines))
    _writer = logging.handlers.QueueListener(lines, *_outputs, respect_handler_level=True)
    _writer.start()


def stop_writer() -> None:
    """Write out what is queued (at exit, and before a worker leaves with os._exit)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


def _after_fork_in_child() -> None:
    if _outputs:  # a forked worker has no writer thread: threads do not survive fork
        _start_writer()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(stop_writer)


def reopen_logs() -> None:
    """SIGHUP: close the log files; the next line written opens them again (after logrotate moved them)."""
    for handler in _outputs:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
            finally:
                handler.release()


def scrub_query(query: str) -> str:
    if not query:
        return ""
    pairs = [(k, "***" if k.lower() in SENSITIVE_PARAMS else v) for k, v in parse_qsl(query, keep_blank_values=True)]
    return "?" + urlencode(pairs, safe="*")


def log_request(handler: Any) -> None:
    """Tornado's ``log_function``: status, method, path, ms, user, IP, request id."""
    status = handler.get_status()
    request = handler.request
    principal = handler.current_user  # the authenticated caller, if any (BaseHandler.get_current_user)
    # 2xx/3xx at debug in production (nginx keeps the full access log; writing one here is a large
    # share of a fast request: bench/README.md, "Figures behind comments in the code"), at info under
    # --debug (a developer has no nginx in front); 4xx at warning, 5xx at error: --log_level=debug
    # shows every request.
    success = logging.INFO if handler.settings.get("debug") else logging.DEBUG
    level = success if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not access_log.isEnabledFor(level):
        return
    access_log.log(
        level,
        "%d %s %s%s %.1fms user=%s ip=%s rid=%s",
        status,
        request.method,
        request.path,
        scrub_query(request.query),
        1000.0 * request.request_time(),
        principal.user_id if principal else "-",
        request.remote_ip,
        getattr(request, "demo_request_id", "-"),
    )
