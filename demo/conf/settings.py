"""Every setting of the server, declared once with its default and help text.

Precedence: command line > ``DEMO_<NAME>`` environment > ``--config`` file > default.
The config file is a Python file of ``name = value`` lines (tornado's format); see
``demo/conf/demo.conf.example``.
"""
from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from tornado.options import Error as OptionsError
from tornado.options import OptionParser

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = PACKAGE_DIR / "data"  # git-ignored; holds the embedded SQLite file and media
ENV_PREFIX = "DEMO_"

MIB = 1024 * 1024


def declare(parser: OptionParser) -> None:
    """Declare every option on ``parser`` (one parser per configuration, never the global one)."""
    d = parser.define
    # -- process ---------------------------------------------------------------------------
    d("port", default=8000, type=int, help="TCP port to listen on", group="server")
    d("address", default="127.0.0.1", type=str, group="server",
      help="address to bind; loopback by default: only nginx on this machine should reach the app")
    d("trusted_proxies", default="127.0.0.0/8,::1", type=str, group="server",
      help="comma list of addresses and CIDR networks whose X-Real-IP / X-Forwarded-For / X-Scheme / "
           "X-Forwarded-Proto headers are believed (nginx's set_real_ip_from); from any other peer its own "
           "address and scheme count")
    d("processes", default=1, type=int, group="server", help="worker processes (0 = one per core)")
    d("config", default="", type=str, group="server", help="path to a config file (python syntax)")
    d("debug", default=False, type=bool, group="server",
      help="development mode: autoreload, tracebacks in logs, a throw-away cookie secret")
    d("public_url", default="", type=str, group="server",
      help="absolute base URL clients use (https://api.example.com); empty = from the request")
    d("shutdown_grace", default=10.0, type=float, group="server",
      help="seconds in-flight requests get to finish after SIGTERM")
    d("idle_timeout", default=75, type=int, group="server",
      help="seconds a client may take to send request headers, and an idle keep-alive connection stays "
           "open (keep it above nginx's upstream keepalive_timeout, 50 s in the sample, so nginx closes first)")
    d("body_timeout", default=120, type=int, group="server",
      help="seconds a client may take to send a whole request body (a 10 MiB upload at 100 KB/s needs ~100)")
    d("cookie_secret", default="", type=str, group="server",
      help="secret for signed cookies and code hashing; required outside debug mode")
    # -- logging ---------------------------------------------------------------------------
    d("log_dir", default=str(PACKAGE_DIR / "log"), type=str, group="logging",
      help="folder for the rotating log file; empty = stderr only")
    d("log_level", default="info", type=str, group="logging", help="debug, info, warning or error")
    # -- database --------------------------------------------------------------------------
    d("database_url", default=f"sqlite:///{DATA_DIR / 'demo.sqlite3'}", type=str, group="database",
      help="SQLAlchemy URL, e.g. mysql+mysqldb://user:pw@127.0.0.1/demo (default: embedded SQLite)")
    d("db_pool_size", default=8, type=int, group="database",
      help="connections kept in the pool; the DB thread pool has the same size")
    d("db_connect_timeout", default=2, type=int, group="database",
      help="seconds to wait for a new MySQL connection before answering 503")
    d("db_io_timeout", default=30, type=int, group="database",
      help="seconds a MySQL read or write may hang (a frozen server) before the request answers 503")
    d("db_pool_recycle", default=1800, type=int, group="database",
      help="seconds after which a connection is replaced (keep below MySQL wait_timeout)")
    d("cpu_workers", default=0, type=int, group="database",
      help="threads for password hashing and image work (0 = one per core)")
    # -- accounts --------------------------------------------------------------------------
    d("default_region", default="CN", type=str, group="accounts",
      help="region used to read national phone numbers (ISO 3166 code)")
    d("token_ttl", default=30 * 24 * 3600, type=int, group="accounts", help="seconds an app token lives")
    d("argon2_time_cost", default=2, type=int, group="accounts", help="argon2id iterations (>= 2)")
    d("argon2_memory_kib", default=19456, type=int, group="accounts", help="argon2id memory in KiB (>= 19456)")
    d("argon2_parallelism", default=1, type=int, group="accounts", help="argon2id lanes")
    # Per-client limits count an IPv4 client by its address and an IPv6 client by its /64.
    d("login_phone_failures", default=10, type=int, group="accounts",
      help="failed logins allowed per phone from one client per login_window; then that client waits "
           "for the window's end (other clients do not: a stranger cannot lock the owner out)")
    d("login_ip_failures", default=100, type=int, group="accounts",
      help="failed logins allowed per client over all phones per login_window")
    d("login_window", default=900, type=int, group="accounts", help="seconds of the login failure window")
    d("login_slowdown_after", default=10, type=int, group="accounts",
      help="failed logins per phone from all clients together per login_window before the phone is slowed "
           "down (not locked) to one attempt per login_slowdown seconds: guesses per phone stay below "
           "login_slowdown_after + login_window / login_slowdown per window; a client that signed in to the phone "
           "within 30 days is not slowed down")
    d("login_slowdown", default=60, type=int, group="accounts",
      help="seconds between two login attempts on a slowed-down phone (see login_slowdown_after)")
    d("code_checks_ip_hourly", default=30, type=int, group="accounts",
      help="registrations and password resets with a wrong or spent SMS code allowed per client per hour, "
           "both together (one budget: alternating must not double it); good ones are not counted")
    d("h5_ticket_ttl", default=120, type=int, group="accounts",
      help="seconds an H5 ticket (h5_url) stays valid; at most 120")
    d("h5_session_ttl", default=24 * 3600, type=int, group="accounts",
      help="seconds an H5 cookie session lives (it also ends with its app session)")
    # -- SMS -------------------------------------------------------------------------------
    d("sms_backend", default="console", type=str, group="sms",
      help="console | file:<path> | http (gateway, see sms_gateway_*)")
    d("sms_test_numbers", default="", type=str, group="sms",
      help="comma list of phone:code pairs that get a fixed code and no text")
    d("sms_countries", default="", type=str, group="sms",
      help="comma list of ISO 3166 region codes texts may go to (e.g. CN,HK); empty = default_region only. "
           "Codes for other numbers, and for non-geographic (satellite) ones, are refused with 422")
    d("sms_send_attempts", default=5, type=int, group="sms",
      help="tries to hand a text to the SMS backend before it is given up (its code is then void)")
    d("sms_retry_delay", default=5.0, type=float, group="sms",
      help="seconds before a failed text is tried again; doubles with each try")
    d("sms_code_ttl", default=300, type=int, group="sms", help="seconds an SMS code is valid")
    d("sms_resend_after", default=60, type=int, group="sms", help="seconds between two texts to one phone")
    d("sms_max_attempts", default=5, type=int, group="sms", help="wrong tries before a code is dead")
    d("sms_phone_daily", default=10, type=int, group="sms", help="texts per phone per UTC day")
    d("sms_ip_hourly", default=20, type=int, group="sms",
      help="texts requested per client per hour (an IPv4 address, an IPv6 /64)")
    d("sms_gateway_url", default="", type=str, group="sms", help="HTTP gateway URL (sms_backend=http)")
    d("sms_gateway_body", default='{"to": $phone, "text": $text}', type=str, group="sms",
      help="request body template; $phone, $text and $code are substituted JSON-encoded")
    d("sms_gateway_headers", default="Content-Type: application/json", type=str, group="sms",
      help="extra request headers, 'Name: value' separated by ';'")
    d("sms_gateway_timeout", default=5.0, type=float, group="sms", help="seconds before the gateway is given up")
    # -- images (scenario 2) -----------------------------------------------------------------
    d("media_root", default=str(DATA_DIR / "media"), type=str, group="images", help="folder for stored images")
    d("max_upload_bytes", default=10 * MIB, type=int, group="images", help="largest accepted upload body")
    d("max_image_pixels", default=40_000_000, type=int, group="images", help="largest accepted image (pixels)")
    d("image_lookup_ttl", default=30.0, type=float, group="images",
      help="seconds an image id stays in a process's lookup cache (another process's delete shows within "
           "it); with nginx's 30 s micro-cache a deleted image is gone everywhere within 60 s")
    d("image_memory_cache", default=64 * MIB, type=int, group="images",
      help="bytes of small image files kept in memory per process (they never change: named by hash)")
    d("image_decode_budget", default=16_000_000, type=int, group="images",
      help="pixels one process may be decoding at once (3-4 bytes each): bounds memory under upload bursts")
    d("max_animation_pixels", default=16_000_000, type=int, group="images",
      help="largest accepted animation: pixels of all its frames together, decoded. Pillow's GIF and APNG "
           "writers keep every frame (about 4 bytes a pixel) until the file is written, so this should fit "
           "image_decode_budget; 16 M admits a 512x512 sticker of 60 frames or a 480x270 GIF of 120 (4-5 s), "
           "and refuses a 1,000-frame 400x400 bomb (160 M pixels, 600+ MB to re-encode) however small its file")
    d("upload_memory", default=32 * MIB, type=int, group="images",
      help="bytes of upload bodies one process may hold in memory at once: a body declared at most 4 MiB "
           "long stays in memory while this allows (no temp file); others stream to a temp file")
    d("image_quota_count", default=1000, type=int, group="images", help="images one user may keep")
    d("image_quota_bytes", default=1024**3, type=int, group="images", help="bytes of images one user may keep")


class Settings(Mapping[str, Any]):
    """Resolved, read-only settings. Attribute and mapping access: ``s.port``, ``s["port"]``."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> Settings:
        unknown = set(changes) - set(self._values)
        if unknown:
            raise KeyError(f"unknown settings: {sorted(unknown)}")
        return Settings({**self._values, **changes})


def _parse_args(parser: OptionParser, args: Sequence[tuple[str, str]]) -> None:
    """``args`` are (where it came from, ``--name=value``): an error names the option and its source."""
    for source, arg in args:
        try:
            stray = parser.parse_command_line(["demo", arg], final=False)
        except (OptionsError, ValueError) as error:  # tornado lets int("eighty") escape as a bare ValueError
            raise OptionsError(f"{source}: {error}") from None
        if stray:
            raise OptionsError(f"{source}: not an option (options look like --name=value)")


def _command_line(argv: Sequence[str]) -> list[tuple[str, str]]:
    return [(arg, arg) for arg in argv]


def _parse_config_file(parser: OptionParser, path: str, names: Sequence[str]) -> None:
    """tornado's parse_config_file, except that an error names the file and the option, and an int
    is fine for a float setting (``shutdown_grace = 10``)."""
    namespace: dict[str, Any] = {"__file__": os.path.abspath(path)}
    try:
        with open(path, "rb") as source:
            exec(compile(source.read(), path, "exec"), namespace)  # noqa: S102 - the operator's own file
    except Exception as error:  # noqa: BLE001 - the file is Python: any error of its code is a bad file
        raise OptionsError(f"--config={path}: {error}") from None
    for name in (name for name in names if name in namespace):
        value, kind = namespace[name], type(getattr(parser, name))  # every default has the option's type
        if kind is float and type(value) is int:
            value = float(value)
        try:
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
    names = [name for name in parser.as_dict() if name != "help"]

    # Find --config first (command line, then environment), then layer the sources in rising order.
    probe = HelpfulParser()  # --help is handled here, first
    declare(probe)
    _parse_args(probe, _command_line(argv))
    config_path = probe.config or environ.get(ENV_PREFIX + "CONFIG", "")
    if config_path:
        _parse_config_file(parser, config_path, names)
    env_args = [
        (f"{ENV_PREFIX}{name.upper()}", f"--{name}={environ[ENV_PREFIX + name.upper()]}")
        for name in names if ENV_PREFIX + name.upper() in environ
    ]
    _parse_args(parser, env_args)
    _parse_args(parser, _command_line(argv))
    return Settings({name: getattr(parser, name) for name in names})


def defaults(**overrides: Any) -> Settings:
    """Default settings with ``overrides`` applied (what tests and embedders use)."""
    return load(argv=[], environ={}).replace(**overrides)


HELP_HEADER = """\
Usage: python -m demo.main [--name=value ...]

Each setting is taken from, strongest first: the command line (--name=value), the environment
(DEMO_NAME=value), the --config file (name = value), its default. Names take "_" or "-" alike
(--sms_backend is --sms-backend); a boolean alone (--debug) means true.
"""


class HelpfulParser(OptionParser):
    """Tornado's parser whose ``--help`` names each option as the README does, with its ``DEMO_*``
    variable, and says which source wins (tornado's own prints dashed names and neither)."""

    def print_help(self, file: TextIO | None = None) -> None:
        print(self.format_help(), file=file or sys.stdout, end="")

    def format_help(self) -> str:
        lines = [HELP_HEADER]
        groups: dict[str, list[Any]] = {}
        for option in self._options.values():
            if option.name != "help":
                groups.setdefault(option.group_name, []).append(option)
        for group, options in groups.items():  # in declaration order: the server's first
            lines.append(f"{group} options:")
            for option in options:
                default = "" if option.default in (None, "") else f"  (default {option.default})"
                lines.append(f"  --{option.name}  {ENV_PREFIX}{option.name.upper()}{default}")
                lines.extend(textwrap.wrap(option.help or "", 100, initial_indent=" " * 6,
                                           subsequent_indent=" " * 6))
            lines.append("")
        return "\n".join(lines)


def help_text() -> str:
    """What ``--help`` prints: every option with its environment name, default and help."""
    parser = HelpfulParser()
    declare(parser)
    return parser.format_help()


__all__ = ["Settings", "load", "defaults", "help_text", "OptionsError", "DATA_DIR", "PACKAGE_DIR"]
