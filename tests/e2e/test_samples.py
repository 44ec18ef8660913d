"""The shipped samples work as shipped: the config file loads and passes the start-up checks, the
supervisor and systemd command lines are valid settings, and what the README tells an operator to
check answers as it says.

tests/e2e/test_production.py checks the rest of these files (graceful stop, ports, `systemd-analyze
verify`, `logrotate -d`) and runs the nginx sample.
"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest

from demo.conf import settings as config
from demo.conf.validate import check_values
from tests.helpers import ROOT

CONF = ROOT / "demo" / "conf"
EXAMPLE = CONF / "demo.conf.example"
SUPERVISOR = CONF / "supervisor" / "demo.conf"
SECRET = "sample-test-" + "s" * 36
COOKIE_LINE = '# cookie_secret = "..."'


def example_with_a_secret(tmp_path: Path) -> Path:
    """The example as an operator fills it in: only the cookie secret's line uncommented."""
    shipped = EXAMPLE.read_text()
    assert COOKIE_LINE in shipped, "the example must show where the cookie secret goes"
    copy = tmp_path / "demo.conf"
    copy.write_text(shipped.replace(COOKIE_LINE, f'cookie_secret = "{SECRET}"'))
    return copy


def test_the_example_config_loads_and_passes_the_start_up_checks(tmp_path):
    settings = config.load([f"--config={example_with_a_secret(tmp_path)}"], environ={})
    check_values(settings)
    assert settings.cookie_secret == SECRET
    assert settings.database_url.startswith("mysql+mysqldb://") and settings.sms_backend == "http"


def supervisor_program() -> configparser.SectionProxy:
    # supervisor's syntax: ; comments, also after a value when preceded by whitespace.
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(SUPERVISOR.read_text())
    return parser["program:demo"]


def demo_arguments(command: str) -> list[str]:
    words = shlex.split(command)
    return words[words.index("demo.main") + 1 :]


def test_the_supervisor_command_is_valid_for_every_process(tmp_path):
    program = supervisor_program()
    first = int(program["numprocs_start"])
    for process_num in range(first, first + int(program["numprocs"])):
        names = {"program_name": "demo", "process_num": process_num, "group_name": "demo"}
        args = demo_arguments(program["command"] % names)
        assert "--config=/etc/demo/demo.conf" in args
        args = [f"--config={example_with_a_secret(tmp_path)}" if a.startswith("--config=") else a for a in args]
        settings = config.load(args, environ={})
        check_values(settings)
        assert settings.port == 8000 + process_num and settings.log_dir == f"/var/log/demo/{settings.port}"


def test_the_supervisor_route_makes_every_folder_the_demo_user_writes(tmp_path):
    """supervisor creates no folder (systemd's units do): its sample and the README say which to make."""
    program = supervisor_program()
    made = re.search(r"install -d -o demo -g demo -m 0750 (.+)", SUPERVISOR.read_text()).group(1).split()
    assert f"install -d -o demo -g demo -m 0750 {' '.join(made)}" in ROOT.joinpath("README.md").read_text()
    settings = config.load([f"--config={example_with_a_secret(tmp_path)}"], environ={})
    log_dir = Path(
        demo_arguments(program["command"] % {"process_num": 1, "program_name": "demo"})[-1].removeprefix("--log_dir=")
    )
    needed = {
        str(log_dir.parent),  # the process makes its own per-port folder in there
        str(Path(program["stdout_logfile"]).parent),
        settings.media_root,
    }
    assert needed <= set(made), f"not made for the demo user: {needed - set(made)}"


@pytest.mark.parametrize("unit", ["demo@.service", "demo.service"])
def test_the_systemd_command_lines_are_valid_settings(unit):
    exec_start = re.search(r"^ExecStart=(.+)$", (CONF / "systemd" / unit).read_text(), re.MULTILINE).group(1)
    args = demo_arguments(exec_start.replace("%i", "8001"))
    settings = config.load(args, environ={"DEMO_COOKIE_SECRET": SECRET})
    check_values(settings)


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_the_readme_s_curl_head_check_gets_200(api, path):
    """README: `curl -sI https://api.example.com/healthz    # 200`."""
    answer = await api.request("HEAD", path)
    assert answer.code == 200 and answer.body == b""
    assert answer.headers["Content-Type"].startswith("application/json")
    assert "curl -sI https://api.example.com/healthz    # 200" in ROOT.joinpath("README.md").read_text()


def test_the_example_s_sms_providers_pass_the_start_up_checks_once_uncommented(tmp_path, monkeypatch):
    """The commented provider block, uncommented as an operator would, loads and passes the checks
    (every template of the default language is there) with the credentials in the environment."""
    shipped = example_with_a_secret(tmp_path).read_text()
    start = shipped.index('# sms_backend = "tencent,aliyun"')
    end = shipped.index("\n\n", start)
    block = "\n".join(line.removeprefix("# ") for line in shipped[start:end].splitlines())
    (tmp_path / "demo.conf").write_text(shipped[:start] + block + shipped[end:])
    for name in ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY"):
        monkeypatch.setenv(name, "from-the-environment")
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"):
        monkeypatch.setenv(name, "from-the-environment")
    settings = config.load([f"--config={tmp_path / 'demo.conf'}"], environ={})
    check_values(settings)
    assert settings.sms_backend == "tencent,aliyun" and settings.sms_tencent_templates.count("=") == 10
