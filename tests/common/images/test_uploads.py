"""The upload's parts without HTTP (images/uploads.py): the sink that finds the file in the body, and
the spool that keeps it (memory within the budget, or a temp file). The receiver: test_receiver.py.
"""

from __future__ import annotations

import os

import pytest

from demo.common.errors import TooLarge
from demo.common.images.uploads import SPOOL_WRITE_BYTES, UploadSink, UploadSpool
from demo.common.infra.memory import Budget

from .support import jpeg, multipart


def test_the_sink_hands_out_only_the_file_bytes_of_a_multipart_body():
    data = jpeg()
    body, content_type = multipart(data)
    sink = UploadSink(content_type, 1024 * 1024)
    found = b"".join(sink.feed(body[i : i + 10]) for i in range(0, len(body), 10))
    sink.finish()
    assert found == data and sink.body_bytes == len(body) and sink.file_bytes == len(data)


def test_the_sink_counts_a_raw_body_against_the_limit():
    sink = UploadSink("image/png", 10)
    assert sink.feed(b"12345") == b"12345"
    with pytest.raises(TooLarge):
        sink.feed(b"123456")


def test_the_spool_keeps_a_declared_small_body_in_memory_within_the_budget(tmp_path):
    budget = Budget(100)
    made: list[str] = []

    def new_temp_file() -> tuple[int, str]:
        path = tmp_path / f"t{len(made)}"
        made.append(str(path))
        return os.open(path, os.O_CREAT | os.O_WRONLY), str(path)

    small = UploadSpool(new_temp_file, budget, 60)
    assert small.in_memory and budget.in_use == 60
    other = UploadSpool(new_temp_file, budget, 60)  # no room left: disk
    assert not other.in_memory and budget.in_use == 60
    assert small.add(b"x" * 60) is None
    assert small.finish(small.take()) == b"x" * 60
    small.discard()
    assert budget.in_use == 0 and made == []
    assert other.add(b"y" * SPOOL_WRITE_BYTES) is not None  # enough gathered for one write
    other.discard()
    assert made == []  # nothing written yet: no file was made
