"""Settings (conf/settings.py): one declaration per setting, and the precedence of the sources."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from demo.common.services import ConfigError, resolve_cookie_secret
from demo.conf import settings as config
from demo.conf.validate import check_values


def test_every_setting_has_help_text():
    parser = config.OptionParser()
    config.declare(parser)
    assert all(option.help for option in parser._options.values() if option.name != "help")


def test_help_names_each_option_as_accepted_with_its_environment_name_and_default():
    """`--help` (run as an operator would) shows `--sms_backend`, as the README writes it, with
    `DEMO_SMS_BACKEND`, its default and help, under a line that says which source wins."""
    run = subprocess.run([sys.executable, "-m", "demo.main", "--help"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "strongest first: the command line (--name=value), the environment\n(DEMO_NAME=value), " \
           "the --config file (name = value), its default" in text
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
        Passwords(time_cost=1)
    with pytest.raises(ValueError):
        Passwords(memory_kib=8192)


@pytest.mark.parametrize("changes", [{"sms_countries": "CN,XX"}, {"sms_countries": " , "},
                                     {"sms_send_attempts": 0}, {"sms_retry_delay": 0.0}])
def test_bad_sms_settings_refuse_to_start(changes, tmp_path):
    from demo.common.services import build_services

    settings = config.defaults(cookie_secret="s" * 40, database_url=f"sqlite:///{tmp_path / 'db'}", **changes)
    with pytest.raises(ConfigError, match="sms_"):
        build_services(settings)


def test_the_defaults_pass_the_start_up_checks():
    check_values(config.defaults(cookie_secret="s" * 40))


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


@pytest.mark.parametrize("changes, option", [
    ({"log_level": "verbose"}, "--log_level"), ({"sms_backend": "smtp"}, "--sms_backend"),
    ({"sms_backend": "http"}, "sms_gateway_url"), ({"default_region": "XX"}, "--default_region"),
    ({"trusted_proxies": "10.0.0.0/8,nope"}, "--trusted_proxies"), ({"public_url": "api.example.com"}, "--public_url"),
    ({"db_pool_size": 0}, "--db_pool_size"), ({"h5_ticket_ttl": 600}, "--h5_ticket_ttl"),
    ({"sms_test_numbers": "123:1"}, "--sms_test_numbers"), ({"argon2_memory_kib": 1024}, "--argon2_time_cost"),
    ({"database_url": "nosuch://u:secret@h/db"}, "--database_url"),
    ({"database_url": "sqlite+pysqlcipher://:secret@/x.db"}, "driver is not installed"), ({"cookie_secret": ""}, "DEMO_COOKIE_SECRET"),
    # Each of these passed once, then failed every request of its kind (or sent texts twice):
    ({"login_slowdown": 0}, "--login_slowdown"), ({"login_window": 0}, "--login_window"),
    ({"sms_gateway_timeout": 0.0}, "--sms_gateway_timeout"), ({"default_region": "CN,US"}, "--default_region"),
])
def test_start_up_checks_name_the_bad_option(changes, option):
    with pytest.raises(ConfigError, match=re.escape(option)) as refused:
        check_values(config.defaults(cookie_secret="s" * 40).replace(**changes))
    assert "secret@" not in str(refused.value)
