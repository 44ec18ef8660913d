"""Every setting checked before the server touches the database or the network.

``check_values`` looks at the values only (types, ranges, choices, the specs the parsers of the
other modules read); ``prepare_folders`` creates the folders the server writes to and checks that it
may. Each problem is one ``StartupError`` naming the option, the path or the database URL (its
password masked): main() prints it as one line and exits with the error's status.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from demo.common.accounts import texts
from demo.common.accounts.passwords import Passwords
from demo.common.accounts.phones import parse_regions
from demo.common.i18n import Languages
from demo.common.infra.offload import Offloader
from demo.common.infra.startup import ConfigError, StorageUnusable, masked_url
from demo.common.services import resolve_cookie_secret
from demo.common.sms.backends import make_backend, parse_backend, parse_test_numbers
from demo.common.sms.outbox import SenderRules
from demo.common.web.proxies import TrustedProxies
from demo.conf.settings import DECLARED, Declared, Settings

LOG_LEVELS = ("debug", "info", "warning", "error")
DATABASES = ("sqlite", "mysql", "mariadb")


def check_values(settings: Settings) -> None:
    """ConfigError naming the first option whose value cannot work."""
    for declared in DECLARED:
        value = getattr(settings, declared.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(declared, value)
    for name, check in VALUE_CHECKS:
        try:
            check(settings)
        except ValueError as error:
            raise ConfigError(f"--{name}: {str(error).removeprefix(name + ': ')}") from None
    if settings.debug and worker_count(settings) > 1:
        raise ConfigError("--debug (autoreload) runs one process; drop --processes or --debug")
    resolve_cookie_secret(settings, warn=False)  # its own ConfigError names DEMO_COOKIE_SECRET


def worker_count(settings: Settings) -> int:
    return settings.processes if settings.processes > 0 else (os.cpu_count() or 1)


def prepare_folders(settings: Settings) -> None:
    """StorageUnusable naming the first folder the server would fail to write to."""
    if settings.log_dir:
        _writable_folder("log_dir", Path(settings.log_dir), create=True)
    _writable_folder("media_root", Path(settings.media_root), create=True)
    database = make_url(settings.database_url)
    if database.get_backend_name() == "sqlite" and database.database not in (None, "", ":memory:"):
        _writable_folder("database_url", Path(database.database).parent, create=True)
    kind, outbox = parse_backend(settings.sms_backend)
    if kind == "file":
        _writable_folder("sms_backend", Path(outbox).parent, create=False)


def _check_range(declared: Declared, value: float) -> None:
    """Every number is at least 0; its declaration may ask for 1 (a zero would refuse everything or
    spin) and set an upper bound."""
    low, high = declared.low, declared.high
    # Written as "not inside", so that NaN (every comparison False; `nan` parses as a float) is outside.
    if not (low <= value and (high is None or value <= high)):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"--{declared.name}={value}: must be {bounds}")


def _writable_folder(name: str, folder: Path, *, create: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise StorageUnusable(f"--{name}: {folder} is a file, not a folder")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise NotADirectoryError(f"no folder {folder}")
    except OSError as error:
        raise StorageUnusable(f"--{name}: cannot use folder {folder}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StorageUnusable(f"--{name}: folder {folder} is not writable for this user (uid {os.getuid()})")


def _log_level(settings: Settings) -> None:
    if settings.log_level.lower() not in LOG_LEVELS:
        raise ValueError(f"{settings.log_level!r} is not one of {', '.join(LOG_LEVELS)}")


def _database_url(settings: Settings) -> None:
    try:
        url = make_url(settings.database_url)
        url.get_dialect()  # loads the dialect (not the driver): an unknown scheme fails here
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise ValueError(
            f"{masked_url(settings.database_url)}: not a SQLAlchemy URL "
            "(sqlite:///path or mysql+mysqldb://user:password@host/database)"
        ) from None
    if url.get_backend_name() not in DATABASES:
        raise ValueError(f"{masked_url(settings.database_url)}: not SQLite or MySQL/MariaDB")
    try:
        url.get_dialect().import_dbapi()
    except ImportError as error:
        raise ValueError(
            f"{masked_url(settings.database_url)}: its driver is not installed ({error}; "
            "for mysql+mysqldb: pip install '.[mysql]')"
        ) from None


def _public_url(settings: Settings) -> None:
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{settings.public_url!r} is not an absolute http(s) URL")


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rule for bucket names
_PREFIX = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def _storage(settings: Settings) -> None:
    if settings.storage in ("", "local"):
        return
    parts = urlsplit(settings.storage)
    if parts.scheme != "s3" or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{settings.storage!r}: empty (the folder media_root) or s3://bucket/prefix")
    if not _BUCKET.fullmatch(parts.netloc):
        raise ValueError(f"{parts.netloc!r} is not an S3 bucket name (3-63 lower-case letters, digits, dots, hyphens)")
    prefix = parts.path.strip("/")
    if (prefix and not _PREFIX.fullmatch(prefix)) or any(part in (".", "..") for part in prefix.split("/")):
        # Names nginx passes on as they are: a character it would escape differently from the
        # signer would fail every presigned URL.
        raise ValueError(f"{parts.path!r}: a prefix of letters, digits, '.', '_' and '-', separated by single slashes")


def _s3_endpoint(settings: Settings) -> None:
    if settings.s3_endpoint:
        parts = urlsplit(settings.s3_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"{settings.s3_endpoint!r}: the store's base URL, e.g. https://s3.example.com")


def _default_region(settings: Settings) -> None:
    regions = parse_regions(settings.default_region, "default_region")
    if len(regions) != 1:  # national numbers are read in this one region; a list would refuse them all
        raise ValueError(f"{settings.default_region!r}: one region code (e.g. CN), not a list")


def _sms_gateway_timeout(settings: Settings) -> None:
    # 0 would mean "no timeout" to Tornado: a hung send could outlive the outbox's claim and go twice.
    if not settings.sms_gateway_timeout > 0:
        raise ValueError(f"{settings.sms_gateway_timeout}: must be above 0")


def _sms_backend(settings: Settings) -> None:
    # Building the backends checks what they need (URLs, sign names, every template of the default
    # language, the providers' credentials in the environment) and sends nothing.
    pools = Offloader(db_threads=1, cpu_threads=1, io_threads=1)  # no thread starts before a task
    try:
        make_backend(settings, pools)
    finally:
        pools.shutdown()


# Each check calls the parser the server itself uses, for its ValueError (what it returns is dropped).
VALUE_CHECKS: list[tuple[str, Callable[[Settings], object]]] = [
    ("trusted_proxies", lambda s: TrustedProxies.parse(s.trusted_proxies)),
    ("public_url", _public_url),
    ("log_level", _log_level),
    ("database_url", _database_url),
    ("default_region", _default_region),
    ("default_language", lambda s: Languages(s.default_language)),
    ("argon2_time_cost", lambda s: Passwords(s.argon2_time_cost, s.argon2_memory_kib, s.argon2_parallelism)),
    ("sms_gateway_timeout", _sms_gateway_timeout),
    ("sms_backend", _sms_backend),
    ("sms_test_numbers", lambda s: parse_test_numbers(s.sms_test_numbers)),
    ("sms_countries", lambda s: parse_regions(s.sms_countries or s.default_region)),
    ("sms_android_app_hash", lambda s: texts.android_app_hash(s.sms_android_app_hash)),
    ("sms_otp_origin", lambda s: texts.otp_origin(s.sms_otp_origin)),
    ("sms_send_attempts", SenderRules.from_settings),
    ("storage", _storage),
    ("s3_endpoint", _s3_endpoint),
]
