"""Under CI (CI=true) a skip fails the run unless ci_allowed_skips allows it (the hook in conftest.py).

Each case runs pytest in a subprocess on a tiny generated test file, with this suite's conftest.py
loaded as a plugin, as CI would meet a test whose tool is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SKIPS_IN_A_TEST = """
import pytest

def test_that_needs_a_tool():
    pytest.skip("frobnicate is not installed")
"""
SKIPS_ITS_MODULE = """
import pytest

pytest.skip("frobnicate is not installed", allow_module_level=True)

def test_that_needs_a_tool():
    pass
"""


def run_pytest(folder, source: str, *options: str, ci: str) -> subprocess.CompletedProcess:
    (folder / "pytest.ini").write_text("[pytest]\n")  # not this suite's settings, nor its tests
    (folder / "test_runs.py").write_text("def test_that_runs():\n    pass\n")
    (folder / "test_tiny.py").write_text(source)
    environ = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            *options,
            "test_runs.py",
            "test_tiny.py",
        ],
        cwd=folder,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("source", [SKIPS_IN_A_TEST, SKIPS_ITS_MODULE], ids=["in-a-test", "at-module-level"])
def test_a_skip_under_ci_fails_the_run_and_names_the_skip(tmp_path, source):
    done = run_pytest(tmp_path, source, ci="true")
    assert done.returncode != 0, done.stdout
    assert "skipped under CI=true" in done.stdout and "frobnicate is not installed" in done.stdout, done.stdout


def test_an_allowed_skip_under_ci_passes(tmp_path):
    done = run_pytest(tmp_path, SKIPS_IN_A_TEST, "-o", "ci_allowed_skips=^frobnicate is not installed$", ci="true")
    assert done.returncode == 0, done.stdout
    assert "1 passed, 1 skipped" in done.stdout, done.stdout


def test_a_skip_outside_ci_stays_a_skip(tmp_path):
    done = run_pytest(tmp_path, SKIPS_IN_A_TEST, ci="")
    assert done.returncode == 0 and "1 passed, 1 skipped" in done.stdout, done.stdout
