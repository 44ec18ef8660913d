"""Settings (conf/settings.py): one declaration per setting, and the precedence of the sources."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from demo.common.accounts.rules import AccountRules
from demo.common.h5.rules import H5Rules
from demo.common.images.rules import ImageRules
from demo.common.services import ConfigError, resolve_cookie_secret
from demo.common.sms.outbox import SenderRules
from demo.conf import settings as config
from demo.conf.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_declared_once_with_type_default_help_and_group():
    """The dataclass is the one declaration: the parser defines exactly its fields, with their help."""
    assert [field.name for field in dataclasses.fields(Settings)] == list(config.NAMES)
    for declared in config.DECLARED:
        assert declared.help.strip() and declared.group, declared.name
        assert type(declared.default) is declared.kind, declared.name
        assert getattr(Settings(), declared.name) == declared.default
    parser = config.OptionParser()
    config.declare(parser)
    assert sorted(name for name in parser.as_dict() if name != "help") == sorted(config.NAMES)


def _another_value(declared: config.Declared, tmp_path: Path) -> config.Value:
    """A value of the setting's type that is not its default."""
    if declared.name == "config":  # the config file itself: it must exist (an empty one)
        path = tmp_path / "other.conf"
        path.write_text("")
        return str(path)
    if declared.kind is bool:
        return not declared.default
    if declared.kind is int:
        return int(declared.default) + 7
    if declared.kind is float:
        return float(declared.default) + 0.25
    return f"{declared.default}-x"


@pytest.mark.parametrize("declared", config.DECLARED, ids=config.NAMES)
def test_every_setting_round_trips_through_command_line_env_and_config_file(declared, tmp_path):
    value = _another_value(declared, tmp_path)
    name, text = declared.name, str(value).lower() if declared.kind is bool else str(value)
    from_command_line = config.load([f"--{name}={text}"], {})
    from_env = config.load([], {f"DEMO_{name.upper()}": text})
    conf = tmp_path / "demo.conf"
    conf.write_text(f"{name} = {value!r}\n")
    sources = [from_command_line, from_env]
    if name != "config":  # a file cannot name another config file: the --config that names it wins
        sources.append(config.load([f"--config={conf}"], {}))
    for loaded in sources:
        assert getattr(loaded, name) == value and type(getattr(loaded, name)) is declared.kind
        assert loaded.replace(**{"config": "", name: declared.default}) == Settings()  # nothing else moved


def test_a_mistyped_setting_is_refused_everywhere(tmp_path):
    with pytest.raises(config.OptionsError, match=r"--db-pool-sise=3: .* \(did you mean db_pool_size\?\)"):
        config.load(["--db-pool-sise=3"], {})
    conf = tmp_path / "demo.conf"
    conf.write_text("import os\n_base = '/srv'\ndb_pool_size = 3\ndb_pool_sise = 3\n")
    with pytest.raises(config.OptionsError, match=f"--config={conf}: db_pool_sise is not a setting \\(did you mean"):
        config.load([f"--config={conf}"], {})
    conf.write_text("import os\n_base = '/srv'\ndb_pool_size = 3\nmedia_root = os.path.join(_base, 'media')\n")
    assert config.load([f"--config={conf}"], {}).media_root == "/srv/media"  # helpers and modules are fine
    with pytest.raises(KeyError, match="db_pool_sise"):
        config.defaults(db_pool_sise=3)
    with pytest.raises(KeyError, match="db_pool_sise"):
        Settings().replace(db_pool_sise=3)
    with pytest.raises(TypeError, match="db_pool_sise"):
        Settings(db_pool_sise=3)  # type: ignore[call-arg]
    with pytest.raises(AttributeError, match="db_pool_sise"):
        Settings().db_pool_sise  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


def test_a_mistyped_setting_is_a_type_error(tmp_path):
    """What the typed declaration is for: mypy (strict, as `make lint` runs it) refuses a misspelt
    name and a value of the wrong type before anything runs."""
    pytest.importorskip("mypy")
    snippet = tmp_path / "uses_settings.py"
    snippet.write_text(
        "from demo.conf.settings import Settings\n\n\n"
        "def pool(settings: Settings) -> int:\n    return settings.db_pool_sise\n\n\n"
        "Settings(port='80')\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(snippet),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert '"Settings" has no attribute "db_pool_sise"; maybe "db_pool_size"?' in run.stdout
    assert 'Argument "port" to "Settings" has incompatible type "str"; expected "int"' in run.stdout


def test_the_rules_take_their_settings_from_settings_and_repeat_no_default():
    """The rules' dataclasses are made by from_settings; the only defaults they keep are constants
    that are not settings."""
    settings = config.defaults(
        token_ttl=5,
        sms_countries="CN, hk",
        h5_session_ttl=7,
        upload_memory=9,
        sms_send_attempts=2,
        sms_gateway_timeout=30.0,
    )
    accounts = AccountRules.from_settings(settings)
    assert accounts.token_ttl == 5 and accounts.sms_regions == {"CN", "HK"} and accounts.default_region == "CN"
    assert AccountRules.from_settings(config.defaults()).sms_regions == {"CN"}  # empty: the default region
    assert H5Rules.from_settings(settings) == H5Rules(ticket_ttl=120, session_ttl=7)
    assert ImageRules.from_settings(settings).upload_memory == 9
    sender = SenderRules.from_settings(settings)
    assert (sender.attempts, sender.retry_delay, sender.lease) == (2, 5.0, 120.0)  # a claim outlives a send
    assert SenderRules.from_settings(config.defaults()).lease == 60.0
    not_settings = {ImageRules: {"memory_cache_item", "variant_lease"}, SenderRules: {"lease", "batch"}}
    for rules in (AccountRules, H5Rules, ImageRules, SenderRules):
        with_default = {
            field.name
            for field in dataclasses.fields(rules)
            if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        }
        assert with_default == not_settings.get(rules, set()), rules
        with pytest.raises(TypeError):
            rules()  # type: ignore[call-arg]


def test_help_names_each_option_as_accepted_with_its_environment_name_and_default():
    """`--help` (run as an operator would) shows `--sms_backend`, as the README writes it, with
    `DEMO_SMS_BACKEND`, its default and help, under a line that says which source wins."""
    run = subprocess.run(
        [sys.executable, "-m", "demo.main", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert (
        "strongest first: the command line (--name=value), the environment\n(DEMO_NAME=value), "
        "the --config file (name = value), its default" in text
    )
    for name, value in config.defaults().items():
        default = "" if value in (None, "") else f"  (default {value})"
        assert f"  --{name}  DEMO_{name.upper()}{default}\n" in text
    assert "--sms_backend  DEMO_SMS_BACKEND  (default console)\n      console | file:<path> | http" in text
    assert "--sms-backend " not in text and "--help  DEMO_HELP" not in text


@pytest.mark.parametrize("spelling", ["--sms_backend", "--sms-backend"])
def test_both_spellings_of_an_option_are_accepted(spelling):
    assert config.load([f"{spelling}=file:/tmp/x"], {}).sms_backend == "file:/tmp/x"


def test_precedence_command_line_over_env_over_file_over_default(tmp_path):
    conf = tmp_path / "demo.conf"
    conf.write_text('port = 7001\naddress = "10.0.0.1"\ndefault_region = "US"\nsms_backend = "file:/tmp/x"\n')
    env = {"DEMO_PORT": "7002", "DEMO_ADDRESS": "10.0.0.2", "DEMO_CONFIG": str(conf)}
    s = config.load(["--port=7003"], env)
    assert s.port == 7003  # command line
    assert s.address == "10.0.0.2"  # environment beats the file
    assert s.default_region == "US"  # file beats the default
    assert s.max_upload_bytes == 10 * 1024 * 1024  # default
    assert s.sms_backend == "file:/tmp/x"


def test_config_file_named_on_the_command_line(tmp_path):
    conf = tmp_path / "demo.conf"
    conf.write_text("port = 7010\n")
    assert config.load([f"--config={conf}"], {}).port == 7010


def test_typed_values_from_the_environment():
    s = config.load([], {"DEMO_DEBUG": "true", "DEMO_MAX_UPLOAD_BYTES": "123", "DEMO_SHUTDOWN_GRACE": "2.5"})
    assert s.debug is True and s.max_upload_bytes == 123 and s.shutdown_grace == 2.5


def test_bad_values_are_refused():
    with pytest.raises(config.OptionsError):
        config.load(["--port=eighty"], {})


def test_production_refuses_to_run_without_a_cookie_secret():
    with pytest.raises(ConfigError, match="DEMO_COOKIE_SECRET"):
        resolve_cookie_secret(config.defaults(debug=False, cookie_secret=""))
    with pytest.raises(ConfigError, match="at least"):
        resolve_cookie_secret(config.defaults(debug=False, cookie_secret="short"))
    assert resolve_cookie_secret(config.defaults(debug=False, cookie_secret="s" * 40)) == "s" * 40
    # Debug mode gets a throw-away secret, different every time: nothing to leak from the repo.
    debug = config.defaults(debug=True, cookie_secret="")
    assert resolve_cookie_secret(debug, warn=False) != resolve_cookie_secret(debug, warn=False)


def test_argon2_parameters_below_owasp_are_refused():
    from demo.common.accounts.passwords import Passwords

    with pytest.raises(ValueError):
        Passwords(time_cost=1, memory_kib=19456, parallelism=1)
    with pytest.raises(ValueError):
        Passwords(time_cost=2, memory_kib=8192, parallelism=1)


@pytest.mark.parametrize(
    "changes",
    [{"sms_countries": "CN,XX"}, {"sms_countries": " , "}, {"sms_send_attempts": 0}, {"sms_retry_delay": 0.0}],
)
def test_bad_sms_settings_refuse_to_start(changes, tmp_path):
    from demo.common.services import build_services

    settings = config.defaults(cookie_secret="s" * 40, database_url=f"sqlite:///{tmp_path / 'db'}", **changes)
    with pytest.raises(ConfigError, match="sms_"):
        build_services(settings)


def test_a_bad_value_names_its_source(tmp_path):
    conf = tmp_path / "demo.conf"
    conf.write_text("shutdown_grace = 'soon'\n")
    with pytest.raises(config.OptionsError, match=f"--config={conf}: shutdown_grace"):
        config.load([f"--config={conf}"], {})
    conf.write_text("port = 80 +\n")
    with pytest.raises(config.OptionsError, match=f"--config={conf}"):
        config.load([f"--config={conf}"], {})
    with pytest.raises(config.OptionsError, match="DEMO_BODY_TIMEOUT"):
        config.load([], {"DEMO_BODY_TIMEOUT": "long"})
    with pytest.raises(config.OptionsError, match="--port=eighty"):
        config.load(["--port=eighty"], {})
    with pytest.raises(config.OptionsError, match="8000: not an option"):
        config.load(["8000"], {})


def test_a_config_file_may_write_a_whole_number_for_a_float_setting(tmp_path):
    conf = tmp_path / "demo.conf"
    conf.write_text('shutdown_grace = 20\nsms_retry_delay = "2"\nport = "7001"\nprocesses = 2\n')
    settings = config.load([f"--config={conf}"], {})
    assert settings.shutdown_grace == 20.0 and isinstance(settings.shutdown_grace, float)
    assert settings.sms_retry_delay == 2.0 and settings.port == 7001 and settings.processes == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no", False),
        ("OFF", False),
        ("False", False),
        ("0", False),
        ("yes", True),
        ("On", True),
        ("TRUE", True),
        ("1", True),
    ],
)
def test_booleans_are_strict_in_the_environment_the_command_line_and_the_config_file(text, expected, tmp_path):
    assert config.load([], {"DEMO_DEBUG": text}).debug is expected
    assert config.load([f"--debug={text}"], {}).debug is expected
    conf = tmp_path / "demo.conf"
    conf.write_text(f"debug = {text!r}\n")
    assert config.load([f"--config={conf}"], {}).debug is expected


@pytest.mark.parametrize("text", ["", "nope", "2", "y es"])
def test_a_value_that_is_not_a_boolean_is_refused(text, tmp_path):
    with pytest.raises(config.OptionsError, match="DEMO_DEBUG"):
        config.load([], {"DEMO_DEBUG": text})
    with pytest.raises(config.OptionsError, match="--debug"):
        config.load([f"--debug={text}"], {})
    conf = tmp_path / "demo.conf"
    conf.write_text(f"debug = {text!r}\n")
    with pytest.raises(config.OptionsError, match="debug"):
        config.load([f"--config={conf}"], {})
    assert config.load(["--debug"], {}).debug is True  # a boolean alone still means true


def test_none_is_refused_for_every_setting_in_a_config_file(tmp_path):
    conf = tmp_path / "demo.conf"
    for name in config.NAMES:
        conf.write_text(f"{name} = None\n")
        with pytest.raises(config.OptionsError, match=f"{name} = None"):
            config.load([f"--config={conf}"], {})


def test_a_bad_boolean_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "demo.main"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[2]), "DEMO_DEBUG": "nah"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "DEMO_DEBUG" in done.stderr
