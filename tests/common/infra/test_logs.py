"""Logging (infra/logs.py): the request log's line and level, secrets masked in the query, and the
file the log goes to."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace
from urllib.parse import parse_qsl

import pytest
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

from demo.common.infra import logs
from demo.common.infra.logs import SENSITIVE_PARAMS, log_request, scrub_query


@pytest.mark.parametrize("name", sorted(SENSITIVE_PARAMS))
def test_a_sensitive_query_value_is_masked(name):
    scrubbed = scrub_query(f"{name}=s3cret-value&page=2")
    assert "s3cret-value" not in scrubbed
    assert parse_qsl(scrubbed.removeprefix("?")) == [(name, "***"), ("page", "2")]


def test_the_names_are_matched_whatever_their_case_and_every_occurrence_is_masked():
    scrubbed = scrub_query("Token=a1&TICKET=b2&token=c3&q=keep")
    assert scrubbed == "?Token=***&TICKET=***&token=***&q=keep"


def test_other_values_survive_encoded_and_blank_values_are_kept():
    assert scrub_query("q=a+b%26c&empty=&code=") == "?q=a+b%26c&empty=&code=***"


def test_no_query_gives_nothing():
    assert scrub_query("") == ""


def test_a_secret_spelled_in_percent_escapes_is_still_masked():
    """``%74oken`` is ``token`` once decoded, as the server reads it."""
    assert "leak" not in scrub_query("%74oken=leak")


# -- the request log -------------------------------------------------------------------------------


def fake_handler(uri: str, status: int, *, user_id: str | None = None, debug: bool = False, method: str = "GET"):
    request = HTTPServerRequest(
        start_line=RequestStartLine(method, uri, "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "api.example.com"}),
        connection=SimpleNamespace(context=SimpleNamespace(remote_ip="198.51.100.7", protocol="http")),
    )
    request.demo_request_id = "rid-12345678"
    principal = SimpleNamespace(user_id=user_id) if user_id else None
    return SimpleNamespace(
        get_status=lambda: status, request=request, current_user=principal, settings={"debug": debug}
    )


def test_the_request_line_masks_secrets_and_says_who_asked(caplog):
    caplog.set_level(logging.DEBUG, logger="demo.access")
    log_request(fake_handler("/h5/home?ticket=T0PSECRET&lang=en", 302, user_id="u-42"))
    [record] = caplog.records
    line = record.getMessage()
    assert "T0PSECRET" not in line
    assert re.fullmatch(
        r"302 GET /h5/home\?ticket=\*\*\*&lang=en \d+\.\dms user=u-42 ip=198\.51\.100\.7 rid=rid-12345678", line
    ), line


def test_an_anonymous_request_logs_a_dash_for_the_user(caplog):
    caplog.set_level(logging.DEBUG, logger="demo.access")
    log_request(fake_handler("/healthz", 200))
    assert "user=- " in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("status", "debug", "level"),
    [
        (200, False, logging.DEBUG),
        (304, False, logging.DEBUG),
        (200, True, logging.INFO),
        (404, False, logging.WARNING),
        (429, True, logging.WARNING),
        (500, False, logging.ERROR),
        (503, True, logging.ERROR),
    ],
)
def test_the_level_follows_the_status(caplog, status, debug, level):
    caplog.set_level(logging.DEBUG, logger="demo.access")
    log_request(fake_handler("/x", status, debug=debug))
    assert [record.levelno for record in caplog.records] == [level]


def test_nothing_is_formatted_below_the_logger_level(caplog):
    caplog.set_level(logging.INFO, logger="demo.access")
    log_request(fake_handler("/x", 200))
    assert caplog.records == []
    log_request(fake_handler("/x", 400))
    assert [record.levelno for record in caplog.records] == [logging.WARNING]


# -- where lines go --------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger("tornado.access").level
    yield
    logs.stop_writer()
    for handler in logs._outputs:
        handler.close()
    logs._outputs.clear()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("tornado.access").setLevel(access_level)


def test_setup_logging_writes_lines_to_the_file_at_the_level_asked(tmp_path, restore_logging):
    folder = tmp_path / "log"
    logs.setup_logging(str(folder), "warning")
    logging.getLogger("demo.test").info("not this one")
    logging.getLogger("demo.test").warning("this one %d", 7)
    logs.stop_writer()  # writes out what is queued
    text = (folder / "demo.log").read_text()
    assert "WARNING" in text and "demo.test: this one 7" in text and "not this one" not in text
    assert logging.getLogger("tornado.access").level == logging.WARNING  # ours replaces Tornado's


def test_reopen_logs_lets_the_next_line_go_to_a_new_file(tmp_path, restore_logging):
    """After logrotate moved the file away, SIGHUP's reopen makes the next line create it again."""
    folder = tmp_path / "log"
    logs.setup_logging(str(folder), "info", self_rotating=False)
    logging.getLogger("demo.test").info("before")
    logs.stop_writer()
    (folder / "demo.log").rename(folder / "demo.log.1")
    logs.reopen_logs()
    logs._start_writer()
    logging.getLogger("demo.test").info("after")
    logs.stop_writer()
    assert "before" in (folder / "demo.log.1").read_text() and "after" not in (folder / "demo.log.1").read_text()
    assert "after" in (folder / "demo.log").read_text()
