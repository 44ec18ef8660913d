"""The start-up checks (conf/validate.py): every bad value is a ConfigError naming its setting, every
unusable folder a StorageUnusable naming its option; nothing here starts a server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from demo.common.infra.startup import ConfigError, StorageUnusable
from demo.conf import settings as config
from demo.conf.validate import check_values, prepare_folders, worker_count


def good(**changes) -> config.Settings:
    return config.defaults(cookie_secret="s" * 40).replace(**changes)


def test_the_defaults_pass_the_start_up_checks():
    check_values(config.defaults(cookie_secret="s" * 40))


@pytest.mark.parametrize(
    "changes, option",
    [
        ({"log_level": "verbose"}, "--log_level"),
        ({"sms_backend": "smtp"}, "--sms_backend"),
        ({"sms_backend": "http"}, "sms_gateway_url"),
        ({"default_region": "XX"}, "--default_region"),
        ({"default_language": "fr"}, "--default_language"),
        ({"default_language": "zh"}, "--default_language"),
        ({"sms_android_app_hash": "FA+9qCX9VS"}, "--sms_android_app_hash"),
        ({"sms_otp_origin": "https://example.com"}, "--sms_otp_origin"),
        ({"trusted_proxies": "10.0.0.0/8,nope"}, "--trusted_proxies"),
        ({"public_url": "api.example.com"}, "--public_url"),
        ({"db_pool_size": 0}, "--db_pool_size"),
        ({"h5_ticket_ttl": 600}, "--h5_ticket_ttl"),
        ({"sms_test_numbers": "123:1"}, "--sms_test_numbers"),
        ({"argon2_memory_kib": 1024}, "--argon2_time_cost"),
        ({"database_url": "nosuch://u:secret@h/db"}, "--database_url"),
        ({"database_url": "sqlite+pysqlcipher://:secret@/x.db"}, "driver is not installed"),
        ({"cookie_secret": ""}, "DEMO_COOKIE_SECRET"),
        # Each of these passed once, then failed every request of its kind (or sent texts twice):
        ({"login_slowdown": 0}, "--login_slowdown"),
        ({"login_window": 0}, "--login_window"),
        ({"sms_gateway_timeout": 0.0}, "--sms_gateway_timeout"),
        ({"default_region": "CN,US"}, "--default_region"),
    ],
)
def test_start_up_checks_name_the_bad_option(changes, option):
    with pytest.raises(ConfigError, match=re.escape(option)) as refused:
        check_values(config.defaults(cookie_secret="s" * 40).replace(**changes))
    assert "secret@" not in str(refused.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"port": 0}, "--port=0: must be from 1 to 65535"),
        ({"port": 65536}, "--port=65536: must be from 1 to 65535"),
        ({"db_pool_size": -1}, "--db_pool_size=-1: must be at least 1"),
        ({"processes": -2}, "--processes=-2: must be at least 0"),
        ({"shutdown_grace": -0.5}, "--shutdown_grace=-0.5: must be at least 0"),
    ],
)
def test_a_number_out_of_its_range_says_the_range(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_values(good(**changes))


@pytest.mark.parametrize("value", [1, 65535])
def test_the_ends_of_a_range_are_allowed(value):
    check_values(good(port=value))


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"public_url": "ftp://example.com"}, "--public_url"),
        ({"public_url": "https://"}, "--public_url"),
        ({"database_url": "postgresql://u@h/db"}, "--database_url"),
        ({"log_level": ""}, "--log_level"),
        ({"sms_backend": "file:"}, "--sms_backend"),
        ({"sms_test_numbers": "+8618800000000:12345"}, "--sms_test_numbers"),
        ({"sms_test_numbers": "8618800000000:123456"}, "--sms_test_numbers"),
        ({"sms_gateway_timeout": -1.0}, "--sms_gateway_timeout"),
        ({"cookie_secret": "short"}, "DEMO_COOKIE_SECRET"),
        ({"storage": "/var/lib/demo/media"}, "--storage"),
        ({"storage": "gs://bucket/images"}, "--storage"),
        ({"storage": "s3://"}, "--storage"),
        ({"storage": "s3://Bucket_1/images"}, "--storage"),
        ({"storage": "s3://key:secret@bucket/images"}, "--storage"),
        ({"storage": "s3://bucket/images/../other"}, "--storage"),
        ({"storage": "s3://bucket/images?x=1"}, "--storage"),
        ({"storage": "s3://bucket/my images"}, "--storage"),
        ({"storage": "s3://bucket/a+b"}, "--storage"),
        ({"storage": "s3://bucket/a//b"}, "--storage"),
        ({"s3_endpoint": "s3.example.com"}, "--s3_endpoint"),
        ({"s3_endpoint": "https://s3.example.com/bucket"}, "--s3_endpoint"),
    ],
)
def test_more_bad_values_name_their_setting(changes, option):
    with pytest.raises(ConfigError, match=re.escape(option)):
        check_values(good(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"log_level": "WARNING"},
        {"public_url": "https://api.example.com/"},
        {"sms_backend": "http", "sms_gateway_url": "http://127.0.0.1:9/send"},
        {"sms_test_numbers": "+8618800000000:123456, +8613900000000:654321"},
        {"database_url": "sqlite:///:memory:"},
        {"storage": "local"},
        {"storage": "s3://demo-images"},
        {"storage": "s3://demo-images/prod/v1/", "s3_endpoint": "https://cos.ap-shanghai.myqcloud.com"},
        {"storage": "s3://demo.images", "s3_endpoint": "http://127.0.0.1:8333/"},
        {"default_language": "zh-CN", "sms_android_app_hash": "FA+9qCX9VSu", "sms_otp_origin": "login.example.com"},
    ],
)
def test_good_values_pass(changes):
    check_values(good(**changes))


def test_the_database_password_is_masked_in_the_message():
    with pytest.raises(ConfigError) as refused:
        check_values(good(database_url="postgresql://admin:hunter2@db/demo"))
    assert "hunter2" not in str(refused.value) and "admin" in str(refused.value)


def test_debug_with_several_processes_is_refused():
    with pytest.raises(ConfigError, match=re.escape("--debug")):
        check_values(good(debug=True, processes=2))
    check_values(good(debug=True, processes=1))


def test_worker_count_is_the_setting_or_one_per_core():
    assert worker_count(good(processes=3)) == 3
    assert worker_count(good(processes=0)) == (os.cpu_count() or 1)


# -- folders ----------------------------------------------------------------------------------------


def folders(tmp_path: Path, **changes) -> config.Settings:
    return good(
        log_dir=str(tmp_path / "log"),
        media_root=str(tmp_path / "media"),
        database_url=f"sqlite:///{tmp_path / 'data' / 'demo.sqlite3'}",
        sms_backend=f"file:{tmp_path / 'outbox.jsonl'}",
    ).replace(**changes)


def test_prepare_folders_creates_the_folders_the_server_writes_to(tmp_path):
    prepare_folders(folders(tmp_path))
    assert (tmp_path / "log").is_dir() and (tmp_path / "media").is_dir() and (tmp_path / "data").is_dir()


def test_no_log_folder_is_made_when_logging_to_stderr_only(tmp_path):
    prepare_folders(folders(tmp_path, log_dir=""))
    assert not (tmp_path / "log").exists()


@pytest.mark.parametrize("option", ["log_dir", "media_root"])
def test_a_file_where_a_folder_should_be_is_named(tmp_path, option):
    (tmp_path / "taken").write_text("")
    with pytest.raises(StorageUnusable, match=re.escape(f"--{option}: {tmp_path / 'taken'} is a file")):
        prepare_folders(folders(tmp_path, **{option: str(tmp_path / "taken")}))


def test_a_sqlite_database_under_a_file_is_named(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(StorageUnusable, match="--database_url"):
        prepare_folders(folders(tmp_path, database_url=f"sqlite:///{tmp_path / 'taken' / 'db.sqlite3'}"))


def test_the_sms_outbox_folder_must_exist_already(tmp_path):
    with pytest.raises(StorageUnusable, match=re.escape("--sms_backend: cannot use folder")):
        prepare_folders(folders(tmp_path, sms_backend=f"file:{tmp_path / 'nowhere' / 'outbox.jsonl'}"))
    assert not (tmp_path / "nowhere").exists()


def test_a_folder_this_user_cannot_write_to_is_named(tmp_path, monkeypatch):
    """The permission check itself (os.access is faked: the tests may run as root, who writes anywhere)."""
    media = str(tmp_path / "media")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != media and real_access(path, mode))
    with pytest.raises(StorageUnusable, match=r"--media_root: folder .* is not writable for this user"):
        prepare_folders(folders(tmp_path))


@pytest.mark.parametrize("name", ["shutdown_grace", "sms_retry_delay", "image_lookup_ttl"])
def test_not_a_number_is_out_of_every_range(name):
    with pytest.raises(ConfigError, match=re.escape(f"--{name}=nan")):
        check_values(good(**{name: float("nan")}))


def test_the_sms_providers_settings_are_checked_at_start_not_at_send_time(sms_providers, monkeypatch):
    """A provider list passes only with each provider's settings, every template of the default
    language and its credentials in the environment; each problem names what to fix."""
    providers = sms_providers.settings("tencent,aliyun")
    check_values(good(**providers))
    with pytest.raises(ConfigError, match=r"--sms_backend: sms_tencent_templates: no template for phone_notice"):
        check_values(
            good(
                **providers
                | {
                    "sms_tencent_templates": "regist=1, reset=2, login=3, phone=4, delete=5,"
                    " regist_notice=6, phone_taken=7, phone_notice.zh-CN=8"
                }
            )
        )
    with pytest.raises(ConfigError, match=r"--sms_backend: sms_aliyun_endpoint: .* plain http to another machine"):
        check_values(good(**providers | {"sms_aliyun_endpoint": "http://dysmsapi.aliyuncs.com"}))
    monkeypatch.delenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
    with pytest.raises(ConfigError, match="needs the environment variable ALIBABA_CLOUD_ACCESS_KEY_SECRET"):
        check_values(good(**providers))
    check_values(good(**providers | {"sms_backend": "tencent"}))  # the one listed is all that is needed
