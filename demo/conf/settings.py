"""Every setting of the server, declared once: its type, default, help text and group.

``Settings`` is a frozen dataclass, one field per setting. The command-line options (tornado's
``OptionParser``), ``--help``, the ``DEMO_<NAME>`` environment variables and the names a ``--config``
file may set are all made from its fields, so a setting is added in one place, and a mistyped name
(``settings.db_pool_sise``) is a type error, not a failure at run time. The rules' own settings
(``AccountRules``, ``H5Rules``, ``ImageRules``, ``SenderRules``) are made from it by their
``from_settings``; none of them repeats a default.

Precedence: command line > ``DEMO_<NAME>`` environment > ``--config`` file > default.
The config file is a Python file of ``name = value`` lines (tornado's format); see
``demo/conf/demo.conf.example``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import textwrap
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

from tornado.options import Error as OptionsError
from tornado.options import OptionParser

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = PACKAGE_DIR / "data"  # git-ignored; holds the embedded SQLite file and media
ENV_PREFIX = "DEMO_"

MIB = 1024 * 1024

Value = str | int | float | bool
_V = TypeVar("_V", str, int, float, bool)


def option(default: _V, help: str, *, group: str, low: float = 0, high: float | None = None) -> _V:
    """One setting: a dataclass field whose metadata carries its help text, its ``--help`` group and,
    for a number, the range demo/conf/validate.py holds it to (``low`` 1 where a zero would refuse
    everything or spin)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "low": low, "high": high})


SERVER, LOGGING, DATABASE, ACCOUNTS, SMS, IMAGES = "server", "logging", "database", "accounts", "sms", "images"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Resolved, read-only settings; ``Settings()`` is every default. Made by ``load`` or ``defaults``."""

    # -- process ---------------------------------------------------------------------------
    port: int = option(8000, "TCP port to listen on", group=SERVER, low=1, high=65535)
    address: str = option(
        "127.0.0.1",
        "address to bind; loopback by default: only nginx on this machine should reach the app",
        group=SERVER,
    )
    trusted_proxies: str = option(
        "127.0.0.0/8,::1",
        "comma list of addresses and CIDR networks whose X-Real-IP / X-Forwarded-For / X-Scheme / "
        "X-Forwarded-Proto headers are believed (nginx's set_real_ip_from); from any other peer its own "
        "address and scheme count",
        group=SERVER,
    )
    processes: int = option(1, "worker processes (0 = one per core)", group=SERVER)
    config: str = option("", "path to a config file (python syntax)", group=SERVER)
    debug: bool = option(
        False, "development mode: autoreload, tracebacks in logs, a throw-away cookie secret", group=SERVER
    )
    public_url: str = option(
        "", "absolute base URL clients use (https://api.example.com); empty = from the request", group=SERVER
    )
    shutdown_grace: float = option(10.0, "seconds in-flight requests get to finish after SIGTERM", group=SERVER)
    housekeeping_interval: float = option(
        600.0,
        "seconds between each process's housekeeping rounds (expired rows, purged accounts, unused blobs, "
        "objects without a row)",
        group=SERVER,
        low=1,
    )
    idle_timeout: int = option(
        75,
        "seconds a client may take to send request headers, and an idle keep-alive connection stays "
        "open (keep it above nginx's upstream keepalive_timeout, 50 s in the sample, so nginx closes first)",
        group=SERVER,
        low=1,
    )
    body_timeout: int = option(
        120,
        "seconds a client may take to send a whole request body (a 10 MiB upload at 100 KB/s needs ~100)",
        group=SERVER,
        low=1,
    )
    cookie_secret: str = option(
        "", "secret for signed cookies and code hashing; required outside debug mode", group=SERVER
    )
    # -- logging ---------------------------------------------------------------------------
    log_dir: str = option(
        str(PACKAGE_DIR / "log"), "folder for the rotating log file; empty = stderr only", group=LOGGING
    )
    log_level: str = option("info", "debug, info, warning or error", group=LOGGING)
    # -- database --------------------------------------------------------------------------
    database_url: str = option(
        f"sqlite:///{DATA_DIR / 'demo.sqlite3'}",
        "SQLAlchemy URL, e.g. mysql+mysqldb://user:pw@127.0.0.1/demo (default: embedded SQLite)",
        group=DATABASE,
    )
    db_pool_size: int = option(
        8, "connections kept in the pool; the DB thread pool has the same size", group=DATABASE, low=1
    )
    db_connect_timeout: int = option(
        2,
        "seconds to wait for a new MySQL connection (its TCP connect and the server's greeting) before giving up on it",
        group=DATABASE,
        low=1,
    )
    db_request_timeout: float = option(
        1.5,
        "seconds a request waits for one unit of work (for a database thread, then for the database) "
        "before it answers 503: a frozen or cut-off database costs this, not a timeout of minutes; a "
        "unit given up on rolls back instead of committing",
        group=DATABASE,
        low=0.1,
    )
    db_io_timeout: int = option(
        2,
        "seconds one MySQL read or write of the request path may hang (a frozen server, a dead link) "
        "before its connection is dropped and replaced; whole seconds (the client library's unit)",
        group=DATABASE,
        low=1,
    )
    db_long_io_timeout: int = option(
        3600,
        "the same for long work: migrations (an ALTER TABLE on a big table), copy-media, the "
        "housekeeping sweeps over whole tables",
        group=DATABASE,
        low=1,
    )
    db_pool_recycle: int = option(
        1800, "seconds after which a connection is replaced (keep below MySQL wait_timeout)", group=DATABASE, low=1
    )
    cpu_workers: int = option(0, "threads for password hashing and image work (0 = one per core)", group=DATABASE)
    # -- accounts --------------------------------------------------------------------------
    default_region: str = option("CN", "region used to read national phone numbers (ISO 3166 code)", group=ACCOUNTS)
    default_language: str = option(
        "en",
        "language (BCP 47 tag) of texts, pages and error messages for a client whose Accept-Language names "
        "none of the supported ones (en, and each catalogue in demo/locale: zh-CN); zh-CN for a Chinese app",
        group=ACCOUNTS,
    )
    token_ttl: int = option(30 * 24 * 3600, "seconds an app token lives", group=ACCOUNTS, low=1)
    argon2_time_cost: int = option(2, "argon2id iterations (>= 2)", group=ACCOUNTS)
    argon2_memory_kib: int = option(19456, "argon2id memory in KiB (>= 19456)", group=ACCOUNTS)
    argon2_parallelism: int = option(1, "argon2id lanes", group=ACCOUNTS, low=1)
    # Per-client limits count an IPv4 client by its address and an IPv6 client by its /64.
    login_phone_failures: int = option(
        10,
        "failed logins allowed per phone from one client per login_window; then that client waits "
        "for the window's end (other clients do not: a stranger cannot lock the owner out)",
        group=ACCOUNTS,
    )
    login_ip_failures: int = option(
        100, "failed logins allowed per client over all phones per login_window", group=ACCOUNTS
    )
    login_window: int = option(900, "seconds of the login failure window", group=ACCOUNTS, low=1)
    login_slowdown_after: int = option(
        10,
        "failed logins per phone from all clients together per login_window before the phone is slowed "
        "down (not locked) to one attempt per login_slowdown seconds: guesses per phone stay below "
        "login_slowdown_after + login_window / login_slowdown per window; a client that signed in to the phone "
        "within 30 days is not slowed down",
        group=ACCOUNTS,
    )
    login_slowdown: int = option(
        60,
        "seconds between two login attempts on a slowed-down phone (see login_slowdown_after)",
        group=ACCOUNTS,
        low=1,
    )
    code_checks_ip_hourly: int = option(
        30,
        "registrations and password resets with a wrong or spent SMS code allowed per client per hour, "
        "both together (one budget: alternating must not double it); good ones are not counted",
        group=ACCOUNTS,
    )
    account_deletion_grace: int = option(
        7 * 24 * 3600,
        "seconds between DELETE /users/me and the purge of the account; signing in again meanwhile "
        "undoes the deletion (0: purged by the next housekeeping round)",
        group=ACCOUNTS,
    )
    dormant_account_after: int = option(
        365 * 24 * 3600,
        "seconds without a login (or a session's use) after which an account is dormant: carriers hand "
        "numbers on, so a reset, login or registration code for its number gives the number's holder a "
        "fresh account and freezes the dormant one (0: never)",
        group=ACCOUNTS,
        low=0,
    )
    sms_login: bool = option(
        True, "allow signing in with an SMS code (purpose 'login') instead of the password", group=ACCOUNTS
    )
    h5_ticket_ttl: int = option(
        120, "seconds an H5 ticket (h5_url) stays valid; at most 120", group=ACCOUNTS, low=1, high=120
    )
    h5_session_ttl: int = option(
        24 * 3600, "seconds an H5 cookie session lives (it also ends with its app session)", group=ACCOUNTS, low=1
    )
    # -- SMS -------------------------------------------------------------------------------
    sms_backend: str = option(
        "console",
        "console | file:<path> | http | tencent | aliyun, or an ordered comma list of the last three (e.g. "
        "tencent,aliyun): a provider that fails or does not answer hands the text to the next (http: the "
        "gateway of sms_gateway_*)",
        group=SMS,
    )
    sms_test_numbers: str = option("", "comma list of phone:code pairs that get a fixed code and no text", group=SMS)
    sms_countries: str = option(
        "",
        "comma list of ISO 3166 region codes texts may go to (e.g. CN,HK); empty = default_region only. "
        "Codes for other numbers, and for non-geographic (satellite) ones, are refused with 422",
        group=SMS,
    )
    sms_send_attempts: int = option(
        5, "tries to hand a text to the SMS backend before it is given up (its code is then void)", group=SMS
    )
    sms_retry_delay: float = option(
        5.0, "seconds before a failed text is tried again; doubles with each try", group=SMS
    )
    sms_code_ttl: int = option(300, "seconds an SMS code is valid", group=SMS, low=1)
    sms_android_app_hash: str = option(
        "",
        "the Android app's 11-character signature hash (SMS Retriever API): set, every text with a code "
        "carries it on a line of its own, so the app reads the code without the SMS permission; empty = none",
        group=SMS,
    )
    sms_otp_origin: str = option(
        "",
        "host name of the site or app the codes are for (example.com): set, every text with a code ends "
        "with the line '@example.com #123456', the origin-bound one-time code format iOS and WebOTP "
        "autofill from, only on that site and its apps (phishing resistance); empty = none",
        group=SMS,
    )
    sms_resend_after: int = option(60, "seconds between two texts to one phone", group=SMS)
    sms_max_attempts: int = option(5, "wrong tries before a code is dead", group=SMS, low=1)
    sms_phone_daily: int = option(10, "texts per phone per UTC day", group=SMS)
    sms_ip_hourly: int = option(20, "texts requested per client per hour (an IPv4 address, an IPv6 /64)", group=SMS)
    sms_daily_budget: int = option(
        1000,
        "texts (code requests, including those answered alike without a text) the whole deployment may "
        "send per UTC day; past it /users/code answers 503 unavailable until midnight UTC (fails closed). "
        "0 = no budget (a warning at start outside debug mode)",
        group=SMS,
    )
    sms_breaker_prefix: int = option(
        5,
        "digits of a number after '+' (calling code included) that make one prefix for the conversion "
        "breaker: 5 makes +86138 one prefix",
        group=SMS,
        low=3,
        high=15,
    )
    sms_breaker_min_sent: int = option(
        20,
        "texts to a prefix over the last 30 to 60 minutes before the breaker judges its conversion",
        group=SMS,
        low=1,
    )
    sms_breaker_min_networks: int = option(
        3,
        "client networks (an IPv4 /24, an IPv6 /48) whose unused texts to a prefix over the last 30 to 60 "
        "minutes it takes before the breaker may trip it: one client, bounded by sms_ip_hourly anyway, "
        "cannot close a prefix to its real users",
        group=SMS,
        low=1,
    )
    sms_breaker_conversion: float = option(
        0.2,
        "codes used / codes sent below which a prefix is throttled (SMS pumping: texts nobody uses); "
        "texts of the last 2 to 4 minutes are not judged yet (0 = the breaker is off)",
        group=SMS,
        high=1,
    )
    sms_breaker_hourly: int = option(
        3,
        "texts per hour a throttled prefix still gets, until its conversion recovers (0 = none)",
        group=SMS,
    )
    sms_gateway_url: str = option("", "HTTP gateway URL (sms_backend=http)", group=SMS)
    sms_gateway_body: str = option(
        '{"to": $phone, "text": $text}',
        "request body template; $phone, $text and $code are substituted JSON-encoded",
        group=SMS,
    )
    sms_gateway_headers: str = option(
        "Content-Type: application/json", "extra request headers, 'Name: value' separated by ';'", group=SMS
    )
    sms_gateway_timeout: float = option(
        5.0, "seconds before one SMS backend (the gateway or a provider) is given up for the next", group=SMS
    )
    # Provider credentials come from the environment only (the names the providers' SDKs read):
    # TENCENTCLOUD_SECRET_ID/_KEY, ALIBABA_CLOUD_ACCESS_KEY_ID/_SECRET.
    sms_tencent_app_id: str = option("", "Tencent Cloud SMS: the SmsSdkAppId of the SMS application", group=SMS)
    sms_tencent_sign_name: str = option("", "Tencent Cloud SMS: the approved signature (SignName)", group=SMS)
    sms_tencent_region: str = option("ap-guangzhou", "Tencent Cloud SMS: the API region (X-TC-Region)", group=SMS)
    sms_tencent_endpoint: str = option(
        "https://sms.tencentcloudapi.com",
        "Tencent Cloud SMS: the API's base URL (plain http only to a loopback address, or under --debug)",
        group=SMS,
    )
    sms_tencent_templates: str = option(
        "",
        "Tencent Cloud SMS: template ids, comma list of key[.language]=id, e.g. regist.zh-CN=1234567,regist.en=1234568;"
        " keys regist, reset, login, phone, delete (parameters: code, minutes) and regist_notice, phone_taken,"
        " phone_notice (none); each key needs one for the default language",
        group=SMS,
    )
    sms_aliyun_sign_name: str = option("", "Alibaba Cloud SMS: the approved signature (SignName)", group=SMS)
    sms_aliyun_endpoint: str = option(
        "https://dysmsapi.aliyuncs.com",
        "Alibaba Cloud SMS: the API's base URL, which also picks the region (plain http only to a loopback "
        "address, or under --debug)",
        group=SMS,
    )
    sms_aliyun_templates: str = option(
        "",
        "Alibaba Cloud SMS: template codes, as sms_tencent_templates (e.g. regist.zh-CN=SMS_123456789); the"
        " code templates take ${code} and ${minutes}",
        group=SMS,
    )
    # -- images (scenario 2) -----------------------------------------------------------------
    storage: str = option(
        "",
        "where images are stored: empty for the folder media_root, or s3://bucket/prefix for an "
        "S3-compatible store (credentials: the AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment variables)",
        group=IMAGES,
    )
    media_root: str = option(
        str(DATA_DIR / "media"),
        "folder for stored images (storage empty), and for uploads in progress with any storage",
        group=IMAGES,
    )
    s3_endpoint: str = option(
        "",
        "the S3 store's URL, e.g. https://cos.ap-shanghai.myqcloud.com (empty: AWS_ENDPOINT_URL, or AWS)",
        group=IMAGES,
    )
    s3_region: str = option("", "the S3 store's region (empty: AWS_REGION, else us-east-1)", group=IMAGES)
    s3_virtual_hosted: bool = option(
        False,
        "address buckets as bucket.endpoint (Tencent COS and Aliyun OSS need it) instead of endpoint/bucket",
        group=IMAGES,
    )
    s3_connect_timeout: float = option(2.0, "seconds to connect to the S3 store", group=IMAGES, low=0.1, high=60)
    s3_url_ttl: float = option(
        300.0,
        "seconds a presigned URL handed to nginx stays valid (reused for half of it); longer than the "
        "clock difference between the app hosts and the store",
        group=IMAGES,
        low=10,
        high=3600,
    )
    s3_timeout: float = option(
        10.0,
        "seconds one request to the S3 store may take before the client gets a 503",
        group=IMAGES,
        low=0.1,
        high=600,
    )
    max_upload_bytes: int = option(10 * MIB, "largest accepted upload body", group=IMAGES, low=1)
    max_image_pixels: int = option(40_000_000, "largest accepted image (pixels)", group=IMAGES, low=1)
    image_lookup_ttl: float = option(
        30.0,
        "seconds an image id stays in a process's lookup cache (another process's delete shows within "
        "it); with nginx's 30 s micro-cache a deleted image is gone everywhere within 60 s",
        group=IMAGES,
    )
    image_memory_cache: int = option(
        64 * MIB,
        "bytes of small image files kept in memory per process (they never change: named by hash)",
        group=IMAGES,
    )
    image_decode_budget: int = option(
        16_000_000,
        "pixels one process may be decoding at once (3-4 bytes each): bounds memory under upload bursts",
        group=IMAGES,
        low=1,
    )
    max_animation_pixels: int = option(
        16_000_000,
        "largest accepted animation: pixels of all its frames together, decoded. Pillow's GIF and APNG "
        "writers keep every frame (about 4 bytes a pixel) until the file is written, so this should fit "
        "image_decode_budget; 16 M admits a 512x512 sticker of 60 frames or a 480x270 GIF of 120 (4-5 s), "
        "and refuses a 1,000-frame 400x400 bomb (160 M pixels, 600+ MB to re-encode) however small its file",
        group=IMAGES,
        low=1,
    )
    upload_memory: int = option(
        32 * MIB,
        "bytes of upload bodies one process may hold in memory at once: a body declared at most 4 MiB "
        "long stays in memory while this allows (no temp file); others stream to a temp file. Puts to "
        "an S3 store (each holds its file in memory) wait for room in it too",
        group=IMAGES,
    )
    image_quota_count: int = option(1000, "images one user may keep", group=IMAGES)
    image_quota_bytes: int = option(1024**3, "bytes of images one user may keep", group=IMAGES)
    orphan_grace: float = option(
        3600.0,
        "seconds an object in the store without its row (a put whose answer was lost, a thumbnail whose "
        "builder lost the database) is kept before housekeeping removes it; far longer than any put or "
        "thumbnail build, and than the clock difference between the app hosts and the store",
        group=IMAGES,
    )
    orphan_sweep_batch: int = option(
        5000,
        "objects of the store each process lists per housekeeping round, looking for those without a row "
        "(the next round goes on from there; a whole pass takes objects / this rounds)",
        group=IMAGES,
        low=1,
    )

    def replace(self, **changes: Value) -> Settings:
        """These settings with ``changes`` (KeyError for a name that is not a setting)."""
        unknown = set(changes) - set(NAMES)
        if unknown:
            raise KeyError(f"unknown settings: {sorted(unknown)}")
        return dataclasses.replace(self, **typing.cast("dict[str, Any]", changes))

    def items(self) -> Iterator[tuple[str, Value]]:
        """(name, value) of every setting, in declaration order."""
        for name in NAMES:
            yield name, getattr(self, name)


@dataclasses.dataclass(frozen=True)
class Declared:
    """What the loaders need to know of one setting."""

    name: str
    kind: type[Value]
    default: Value
    help: str
    group: str
    low: float  # numbers only
    high: float | None


def _declared() -> tuple[Declared, ...]:
    hints = typing.get_type_hints(Settings)
    kinds: dict[object, type[Value]] = {str: str, int: int, float: float, bool: bool}
    declared = []
    for f in dataclasses.fields(Settings):
        kind, default = kinds.get(hints[f.name]), f.default
        if kind is None or type(default) is not kind or not isinstance(default, kind) or not f.metadata.get("help"):
            raise TypeError(f"setting {f.name}: declare it as `{f.name}: str | int | float | bool = option(...)`")
        meta = f.metadata
        declared.append(Declared(f.name, kind, default, meta["help"], meta["group"], meta["low"], meta["high"]))
    return tuple(declared)


DECLARED: Final = _declared()
NAMES: Final = tuple(d.name for d in DECLARED)
KINDS: Final[Mapping[str, type[Value]]] = {d.name: d.kind for d in DECLARED}


def declare(parser: OptionParser) -> None:
    """Define every setting on ``parser`` (one parser per configuration, never the global one)."""
    for d in DECLARED:
        parser.define(d.name, default=d.default, type=d.kind, help=d.help, group=d.group)


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def strict_bool(value: str) -> str:
    """``value`` of a boolean setting as "true" or "false": tornado reads anything but false/0/f as
    true (``no``, ``off``, empty); here only true/false/1/0/yes/no/on/off, in any case, are accepted."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return "true"
    if lowered in _FALSE:
        return "false"
    raise ValueError(f"{value!r} is not a boolean (true/false, 1/0, yes/no, on/off)")


def _strict_arg(arg: str) -> str:
    """``--name=value`` with a boolean's value made strict (``--name`` alone still means true)."""
    name, equals, value = arg.removeprefix("--").partition("=")
    if equals and KINDS.get(name.replace("-", "_")) is bool:
        return f"--{name}={strict_bool(value)}"
    return arg


def _parse_args(parser: OptionParser, args: Sequence[tuple[str, str]]) -> None:
    """``args`` are (where it came from, ``--name=value``): an error names the option and its source."""
    for source, arg in args:
        try:
            arg = _strict_arg(arg)
            stray = parser.parse_command_line(["demo", arg], final=False)
        except (OptionsError, ValueError) as error:  # tornado lets int("eighty") escape as a bare ValueError
            name = arg.removeprefix("--").partition("=")[0].replace("-", "_")
            hint = "" if name in KINDS else _did_you_mean(name)
            raise OptionsError(f"{source}: {error}{hint}") from None
        if stray:
            raise OptionsError(f"{source}: not an option (options look like --name=value)")


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, NAMES, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _command_line(argv: Sequence[str]) -> list[tuple[str, str]]:
    return [(arg, arg) for arg in argv]


def _parse_config_file(parser: OptionParser, path: str) -> None:
    """tornado's parse_config_file, except that an error names the file and the option, a name that
    is not a setting is refused rather than ignored, and an int is fine for a float setting
    (``shutdown_grace = 10``)."""
    namespace: dict[str, Any] = {"__file__": os.path.abspath(path)}
    try:
        with open(path, "rb") as source:
            exec(compile(source.read(), path, "exec"), namespace)  # the operator's own file
    except Exception as error:  # noqa: BLE001 - the file is Python: any error of its code is a bad file
        raise OptionsError(f"--config={path}: {error}") from None
    for name, value in namespace.items():  # a misspelt name would be dropped without a word: refuse it
        if name not in KINDS and not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
            hint = _did_you_mean(name)
            raise OptionsError(f"--config={path}: {name} is not a setting{hint}; start a helper's name with _")
    for name in (name for name in NAMES if name in namespace):
        value, kind = namespace[name], KINDS[name]
        if value is None:
            raise OptionsError(
                f"--config={path}: {name} = None: a setting needs a value (leave it out for the default)"
            )
        if kind is float and type(value) is int:
            value = float(value)
        try:
            if kind is bool and isinstance(value, str):
                value = strict_bool(value)
            if isinstance(value, str) and kind is not str:
                parser.parse_command_line(["demo", f"--{name}={value}"], final=False)  # "30" for an int
            else:
                setattr(parser, name, value)
        except (OptionsError, ValueError) as error:
            raise OptionsError(f"--config={path}: {name} = {value!r}: {error}") from None


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve settings from defaults, config file, environment and command line (in rising priority)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    parser = HelpfulParser()
    declare(parser)

    # Find --config first (command line, then environment), then layer the sources in rising order.
    probe = HelpfulParser()  # --help is handled here, first
    declare(probe)
    _parse_args(probe, _command_line(argv))
    config_path = probe.config or environ.get(ENV_PREFIX + "CONFIG", "")
    if config_path:
        _parse_config_file(parser, config_path)
    env_args = [
        (f"{ENV_PREFIX}{name.upper()}", f"--{name}={environ[ENV_PREFIX + name.upper()]}")
        for name in NAMES
        if ENV_PREFIX + name.upper() in environ
    ]
    _parse_args(parser, env_args)
    _parse_args(parser, _command_line(argv))
    return Settings(**{name: getattr(parser, name) for name in NAMES})


def defaults(**overrides: Value) -> Settings:
    """Default settings with ``overrides`` applied (what tests and embedders use)."""
    return Settings().replace(**overrides)


HELP_HEADER = """\
Usage: python -m demo.main [--name=value ...]

Each setting is taken from, strongest first: the command line (--name=value), the environment
(DEMO_NAME=value), the --config file (name = value), its default. Names take "_" or "-" alike
(--sms_backend is --sms-backend); a boolean alone (--debug) means true, and a boolean's value is
true/false, 1/0, yes/no or on/off (any case); None is no value.
"""


class HelpfulParser(OptionParser):
    """Tornado's parser whose ``--help`` names each option as the README does, with its ``DEMO_*``
    variable, and says which source wins (tornado's own prints dashed names and neither)."""

    def print_help(self, file: TextIO | None = None) -> None:
        print(self.format_help(), file=file or sys.stdout, end="")

    def format_help(self) -> str:
        return help_text()


def help_text() -> str:
    """What ``--help`` prints: every setting with its environment name, default and help, by group."""
    lines = [HELP_HEADER]
    groups: dict[str, list[Declared]] = {}
    for d in DECLARED:  # in declaration order: the server's first
        groups.setdefault(d.group, []).append(d)
    for group, declared in groups.items():
        lines.append(f"{group} options:")
        for d in declared:
            default = "" if d.default == "" else f"  (default {d.default})"
            lines.append(f"  --{d.name}  {ENV_PREFIX}{d.name.upper()}{default}")
            lines.extend(textwrap.wrap(d.help, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
        lines.append("")
    return "\n".join(lines)


__all__ = [
    "DATA_DIR",
    "DECLARED",
    "Declared",
    "NAMES",
    "PACKAGE_DIR",
    "OptionsError",
    "Settings",
    "Value",
    "declare",
    "defaults",
    "help_text",
    "load",
    "option",
]
