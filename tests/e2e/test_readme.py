"""README's "Try it" block runs as pasted: extracted from README.md and run with bash (errexit,
nounset, pipefail) against the server the block starts itself, it walks the whole app story."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, free_port

# The block's one server-start line: environment assignments, then `make run ARGS=...` in the background.
START_LINE = re.compile(r"^(?P<env>(?:\w+=\S+ )*)make run ARGS=(?P<args>\S+) &$", re.M)
# What `make run` runs, from the Makefile: the block's server is started the same way, minus the
# install step (the suite already runs in an installed environment).
RUN_RECIPE = re.compile(r"^run: .*\n\t\$\(BIN\)/python -m demo\.main (?P<args>.*) \$\(ARGS\)$", re.M)


def try_it_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Try it\n(.*?)(?=^## )", readme, re.M | re.S)
    assert section, 'README.md has no "## Try it" section'
    block = re.search(r"^```sh\n(.*?)^```$", section.group(1), re.M | re.S)
    assert block, 'README.md\'s "## Try it" section has no ```sh block'
    return block.group(1)


def with_server_from_this_checkout(block: str, port: int) -> str:
    """The block with `make run` replaced by the command it runs, and the port by a free one."""
    starts = START_LINE.findall(block)
    assert len(starts) == 1, f"the Try it block should start the server once, `make run ARGS=... &`: {starts}"
    recipe = RUN_RECIPE.search((ROOT / "Makefile").read_text(encoding="utf-8"))
    assert recipe, "the Makefile's run target no longer runs `$(BIN)/python -m demo.main ... $(ARGS)`"
    server = f"{shlex.quote(sys.executable)} -m demo.main {recipe.group('args')}"
    block = START_LINE.sub(lambda m: f"{m.group('env')}{server} {m.group('args')} &", block)
    assert block.count("localhost:8000") >= 5 and block.count("--port=8000") == 1
    block = block.replace("localhost:8000", f"localhost:{port}").replace("--port=8000", f"--port={port}")
    assert "8000" not in block
    return block


def json_lines(output: str) -> list[Any]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_try_it_block_runs_as_pasted_and_walks_the_app_story(tmp_path: Path):
    port = free_port()
    # When the block stops (done or failed) the server it started in the background stops too.
    block = with_server_from_this_checkout(try_it_block(), port)
    script = f"trap 'kill $! 2>/dev/null && wait $!' EXIT\n{block}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    # mktemp -d in the block makes its data folder here; the log goes here too: the checkout's
    # demo/data and demo/log stay untouched.
    env.update(TMPDIR=str(tmp_path), DEMO_LOG_DIR=str(tmp_path))
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        bash = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            code = bash.wait(timeout=90)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(bash.pid, signal.SIGKILL)  # whatever is left of a block that hung
    output, log = out.read_text(), err.read_text()
    assert code == 0, f"the Try it block failed (status {code}):\n{output}\n{log}"

    answers = json_lines(output)
    assert answers[0] == {"expires_in": 300, "resend_after": 60}  # the code
    registered, logged_in = answers[1], answers[2]
    for session in (registered, logged_in):
        assert session["token_type"] == "Bearer"
        assert session["h5_url"].startswith(f"http://localhost:{port}/h5/home?ticket=")
    assert logged_in["user"]["id"] == registered["user"]["id"]
    image = answers[3]["image"]
    assert image["format"] == "png" and set(image["thumbnails"]) == {"160", "320", "640", "1280"}
    assert len(re.findall(r"^200 image/png \d+ bytes$", output, re.M)) == 2  # the image and its thumbnail
    assert re.search(r"^<title>[^<]+</title>$", output, re.M)  # the H5 page, after the ticket's redirect
    assert re.search(r"^204 logged out$", output, re.M)
    assert answers[-1]["error"]["code"] == "unauthorized"  # the token died with the logout
    data = [path.parent.name for path in tmp_path.glob("*/demo.sqlite3")]
    assert len(data) == 1 and (tmp_path / data[0] / "media").is_dir()  # the block's throw-away data folder
    assert "stopped" in log  # the server the block started is gone
