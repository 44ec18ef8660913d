"""Builds the long-lived objects of one process from the settings (and closes them)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field

from demo.common.accounts.passwords import Passwords
from demo.common.accounts.rules import AccountRules, Accounts
from demo.common.h5.rules import H5, H5Rules
from demo.common.i18n import Languages
from demo.common.images import imaging
from demo.common.images.rules import ImageRules, Images
from demo.common.images.storage import ImageStore, make_store
from demo.common.infra.clock import Clock
from demo.common.infra.db import Database, database_for
from demo.common.infra.metrics import Metrics
from demo.common.infra.offload import Offloader
from demo.common.infra.readiness import Readiness
from demo.common.infra.startup import ConfigError
from demo.common.sms.backends import make_backend, parse_test_numbers
from demo.common.sms.costguard import CostGuard, CostRules
from demo.common.sms.outbox import Sender, SenderRules
from demo.conf.settings import Settings

log = logging.getLogger("demo")
MIN_SECRET_LENGTH = 32


@dataclass
class Services:
    settings: Settings
    clock: Clock
    offloader: Offloader
    db: Database
    passwords: Passwords
    sender: Sender
    accounts: Accounts
    store: ImageStore
    images: Images
    h5: H5
    metrics: Metrics
    cookie_secret: str
    cost_guard: CostGuard
    languages: Languages  # the catalogues, loaded once: texts, pages and error messages
    readiness: Readiness = field(init=False)

    def __post_init__(self) -> None:
        self.readiness = Readiness(
            {"database": lambda: self.db.ping(), "storage": lambda: self.offloader.io(self.store.identity)}
        )

    def close(self) -> None:
        """After ``await sender.stop()`` (it uses the pools closed here)."""
        self.offloader.shutdown()
        self.db.dispose()


def resolve_cookie_secret(settings: Settings, *, warn: bool = True) -> str:
    """The configured secret; in debug mode only, a throw-away one when none is set."""
    secret = settings.cookie_secret
    if secret:
        if len(secret) < MIN_SECRET_LENGTH and not settings.debug:
            raise ConfigError(f"DEMO_COOKIE_SECRET must be at least {MIN_SECRET_LENGTH} characters")
        return secret
    if not settings.debug:
        raise ConfigError(
            "DEMO_COOKIE_SECRET is not set. Generate one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    if warn:
        log.warning("debug mode: using a throw-away cookie secret (cookies and codes die with this process)")
    return secrets.token_urlsafe(48)


def derived_key(cookie_secret: str, purpose: bytes) -> bytes:
    """A key of its own per use (SMS codes, H5 form tokens): HMACs are never keyed with the secret itself."""
    return hmac.new(cookie_secret.encode(), purpose, hashlib.sha256).digest()


def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    """Every long-lived object of one process; ConfigError names a setting that cannot work."""
    cookie_secret = resolve_cookie_secret(settings)
    clock = clock or Clock()
    app_metrics = Metrics()
    offloader = Offloader(db_threads=settings.db_pool_size, cpu_threads=settings.cpu_workers)
    db = database_for(settings, offloader, app_metrics)
    passwords = Passwords(settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism)
    try:
        backend = make_backend(settings, offloader, app_metrics)
        test_numbers = parse_test_numbers(settings.sms_test_numbers)
        account_rules = AccountRules.from_settings(settings)
        sender_rules = SenderRules.from_settings(settings)
        languages = Languages(settings.default_language)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if not settings.sms_daily_budget and not settings.debug:
        log.warning("sms_daily_budget is 0: nothing bounds what a day's texts may cost (set a budget)")
    cost_guard = CostGuard(CostRules.from_settings(settings, test_numbers), db, app_metrics)
    sender = Sender(db, backend, app_metrics, clock, sender_rules)
    code_key = derived_key(cookie_secret, b"demo sms codes")
    accounts = Accounts(
        db,
        passwords,
        sender,
        code_key=code_key,
        rules=account_rules,
        test_numbers=test_numbers,
        clock=clock,
        cost_guard=cost_guard,
        languages=languages,
    )
    h5 = H5(db, H5Rules.from_settings(settings), clock, xsrf_key=derived_key(cookie_secret, b"demo h5 xsrf"))
    store = make_store(settings)
    images = Images(db, store, ImageRules.from_settings(settings), clock)
    imaging.configure(settings.max_image_pixels, settings.image_decode_budget)
    return Services(
        settings,
        clock,
        offloader,
        db,
        passwords,
        sender,
        accounts,
        store,
        images,
        h5,
        app_metrics,
        cookie_secret,
        cost_guard,
        languages,
    )
