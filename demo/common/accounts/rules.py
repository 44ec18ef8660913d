"""Scenario 1 rules: SMS codes, registration, login (with the password or an SMS code), logout, password
reset, token checks, the list of sessions (devices), password and phone changes, account deletion, and
recycled numbers (a dormant account is frozen, not handed to whoever holds its number now).

No Tornado here: handlers call these coroutines with plain values and get plain values or a
``DemoError`` back. Database work runs through ``Database.run`` and hashing through the CPU pool.
"""

from __future__ import annotations

import datetime as dt
import functools
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from demo.common.accounts import queries, texts, tokens
from demo.common.accounts.devices import clean_user_agent, coarse_ip
from demo.common.accounts.passwords import Passwords, check_password_policy
from demo.common.accounts.phones import normalize_phone, parse_regions, require_region
from demo.common.accounts.principal import Principal
from demo.common.errors import (
    AccountDisabled,
    InvalidCode,
    InvalidCredentials,
    InvalidField,
    InvalidPhone,
    NotFound,
    PhoneTaken,
    Unauthorized,
)
from demo.common.h5.rules import new_ticket
from demo.common.i18n import N_, Languages
from demo.common.infra import ratelimit
from demo.common.infra.clock import Clock, isoformat
from demo.common.infra.db import Conflict, Database, Row
from demo.common.infra.ratelimit import Window
from demo.common.sms import outbox
from demo.common.sms.costguard import CostGuard

if TYPE_CHECKING:
    from demo.conf.settings import Settings

PURPOSES = ("regist", "reset", "phone", "login", "delete")
# Purposes whose code only an account can use: for a phone without one, nothing is sent (as for
# "reset"), and the answer is the same.
FOR_ACCOUNTS = ("reset", "login", "delete")
# A session's last use is written by the token check at most this often (the check is every request's).
TOUCH_EVERY = dt.timedelta(seconds=60)
# How long the notice to the old phone of a phone change may wait for the SMS gateway: a security
# notice is worth sending late, unlike a code.
NOTICE_TTL = dt.timedelta(days=1)


class LoginWindows(NamedTuple):
    """Where a login attempt counts (Accounts.login_windows), in key order (ratelimit.reserve)."""

    by_client: Window  # one client, every phone
    by_phone: Window  # every client, one phone: past its limit, the phone is slowed down to ``pace``
    by_phone_client: Window  # one client, one phone
    pace: Window  # every client, one phone: one attempt per window once ``by_phone`` is past its limit


# A client that signed in to a phone is remembered for it (Accounts.known_client) for TRUST_SECONDS
# to twice that: the success is counted in this window and the next, and the current one is read.
TRUST_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True, kw_only=True)
class AccountRules:
    """The settings the account rules read (defaults and meaning: demo/conf/settings.py)."""

    default_region: str
    sms_regions: frozenset[str]  # countries texts may go to
    token_ttl: int
    code_ttl: int
    resend_after: int
    max_attempts: int
    phone_daily: int
    ip_hourly: int
    login_phone_failures: int
    login_ip_failures: int
    login_window: int
    login_slowdown_after: int
    login_slowdown: int
    code_checks_ip_hourly: int
    h5_ticket_ttl: int  # the ticket a login hands out with its session
    deletion_grace: int  # seconds from DELETE /users/me to the purge; a login meanwhile undoes it
    sms_login: bool  # a login may prove the phone with a "login" code instead of the password
    dormant_after: int  # seconds without activity that make an account dormant (0: never)
    android_app_hash: str  # a line of its own in texts with a code (texts.py; "" none)
    otp_origin: str  # texts with a code end with "@<otp_origin> #<code>" (texts.py; "" none)

    @classmethod
    def from_settings(cls, settings: Settings) -> AccountRules:
        """ValueError naming the setting for a bad ``sms_countries``, ``sms_android_app_hash`` or ``sms_otp_origin``."""
        return cls(
            default_region=settings.default_region,
            sms_regions=parse_regions(settings.sms_countries or settings.default_region),
            token_ttl=settings.token_ttl,
            code_ttl=settings.sms_code_ttl,
            resend_after=settings.sms_resend_after,
            max_attempts=settings.sms_max_attempts,
            phone_daily=settings.sms_phone_daily,
            ip_hourly=settings.sms_ip_hourly,
            login_phone_failures=settings.login_phone_failures,
            login_ip_failures=settings.login_ip_failures,
            login_window=settings.login_window,
            login_slowdown_after=settings.login_slowdown_after,
            login_slowdown=settings.login_slowdown,
            code_checks_ip_hourly=settings.code_checks_ip_hourly,
            h5_ticket_ttl=settings.h5_ticket_ttl,
            deletion_grace=settings.account_deletion_grace,
            sms_login=settings.sms_login,
            dormant_after=settings.dormant_account_after,
            android_app_hash=texts.android_app_hash(settings.sms_android_app_hash),
            otp_origin=texts.otp_origin(settings.sms_otp_origin),
        )


@dataclass(frozen=True)
class Grant:
    """A new app session: what the session body of the contract is made from."""

    user: dict[str, Any]
    token: str
    expires_in: int
    session_id: int
    h5_ticket: str
    deletion_cancelled: bool = False  # the login undid a deletion in its grace period


class Accounts:
    def __init__(
        self,
        db: Database,
        passwords: Passwords,
        sender: outbox.Sender,
        *,
        code_key: bytes,
        rules: AccountRules,
        test_numbers: dict[str, str] | None = None,
        clock: Clock | None = None,
        languages: Languages | None = None,
        cost_guard: CostGuard | None = None,
    ) -> None:
        self.db = db
        self.cost_guard = cost_guard or CostGuard(None)
        self.passwords = passwords
        self.sender = sender
        self.code_key = code_key
        self.rules = rules
        self.test_numbers = test_numbers or {}
        self.clock = clock or Clock()
        self.languages = languages or Languages()  # the texts' words (English only: the source's)
        self._fresh_hash: str | None = None  # see fresh_hash

    def dormant_before(self, now: dt.datetime) -> dt.datetime | None:
        """An account with no activity since this time is dormant (None: the rule is off)."""
        return now - dt.timedelta(seconds=self.rules.dormant_after) if self.rules.dormant_after else None

    async def fresh_hash(self) -> str:
        """The password hash of an account an SMS login made (for a recycled number): the hash of a random
        secret, forgotten at once, so no password matches it, yet checking one costs a full hash as for
        any account (a quick refusal would tell that the account has no password). Made once per process."""
        if self._fresh_hash is None:
            self._fresh_hash = await self.db.offloader.cpu(self.passwords.hash, secrets.token_urlsafe(32))
        return self._fresh_hash

    def phone(self, raw: Any) -> str:
        return normalize_phone(raw, self.rules.default_region)

    @property
    def purposes(self) -> tuple[str, ...]:
        """The code purposes this server issues ("login" only while SMS login is on)."""
        return PURPOSES if self.rules.sms_login else tuple(p for p in PURPOSES if p != "login")

    # -- SMS codes -----------------------------------------------------------------------------

    async def request_code(
        self, raw_phone: Any, purpose: Any, client_ip: str, lang: str | None = None
    ) -> dict[str, int]:
        """Issue a code and queue its text in ``lang`` (the requester's; None: the default language), or,
        for a registered phone asking to register, a notice without one. The answer comes once both are
        committed, before anything is sent: it cannot depend on the SMS gateway, nor on whether the
        phone has an account."""
        phone = self.phone(raw_phone)
        if purpose not in self.purposes:
            named = ", ".join(f"'{p}'" for p in self.purposes)
            raise InvalidField(N_("purpose must be one of {purposes}."), field="purpose", params={"purposes": named})
        if phone not in self.test_numbers:  # test numbers are never texted
            require_region(phone, self.rules.sms_regions)
        now, r = self.clock.now(), self.rules
        request = queries.CodeRequest(
            phone,
            purpose,
            by_phone=Window(queries.sms_phone_key(phone), r.phone_daily, 86400),
            by_client=Window(f"sms:ip:{ratelimit.client_key(client_ip)}", r.ip_hourly, 3600),
            resend_after=r.resend_after,
            expires_at=now + dt.timedelta(seconds=r.code_ttl),
            dormant_before=self.dormant_before(now),
            guard=self.cost_guard.send_guard(phone, client_ip),
        )
        compose = functools.partial(self._code_text, phone, purpose, lang)
        await self.cost_guard.checked(self.db.run(queries.issue_code, request, now, compose), now)
        self.sender.wake()
        return {"expires_in": self.rules.code_ttl, "resend_after": self.rules.resend_after}

    def _code_text(
        self, phone: str, purpose: str, lang: str | None, registered: bool, dormant: bool
    ) -> queries.CodeText:
        """The code and text of a code request, in ``lang`` (``registered``: the phone has an account;
        ``dormant``: a dormant one, which a registration with the code freezes, as a reset or SMS login
        would). A text with a code ends with the autofill lines (texts.py)."""
        lang = self.languages.pick(lang)
        code: str | None = self.test_numbers.get(phone) or f"{secrets.randbelow(10**6):06d}"
        text: str | None
        if purpose == "regist" and registered and not dormant:
            code, text = None, self.languages.translate(lang, texts.REGISTERED)
        elif purpose == "phone" and registered and not dormant:
            # As for "regist": the answer is the same either way, only the number's holder learns that
            # it has an account (which "regist" would tell them too), and no code is spent on a change
            # that the taken number would refuse.
            code, text = None, self.languages.translate(lang, texts.PHONE_TAKEN)
        elif purpose in FOR_ACCOUNTS and not registered:
            code, text = None, None  # no account to act on; answer exactly as if a code went out
        else:
            assert code is not None
            words = texts.CODE_TEXTS.get(purpose, texts.CODE)
            text = self.languages.translate(lang, words, {"code": code, "minutes": self.rules.code_ttl // 60})
            text = texts.with_autofill(text, code, app_hash=self.rules.android_app_hash, origin=self.rules.otp_origin)
        code_hash = tokens.keyed_digest(self.code_key, phone, purpose, code) if code else ""
        if phone in self.test_numbers:
            code = text = None  # test numbers are never texted
        return queries.CodeText(code_hash, text, code, lang)

    # -- registration, login, logout, reset ------------------------------------------------------

    def _code_checks(self, client_ip: str) -> Window:
        """Registrations and resets share one budget per client: both are "check a code, then hash"."""
        return Window(f"code:ip:{ratelimit.client_key(client_ip)}", self.rules.code_checks_ip_hourly, 3600)

    async def _claim_code(
        self, phone: str, purpose: str, code: str, checks: Window, now: dt.datetime, client_ip: str
    ) -> None:
        """Spend ``code`` before any password is hashed: a wrong code costs no hash, and of parallel
        requests carrying one good code only the first gets past here. Raises InvalidCode (the wrong
        guess is counted against the code) or RateLimited (the client's checks are used up)."""
        code_hash = tokens.keyed_digest(self.code_key, phone, purpose, code)
        used = self.cost_guard.use_guard(phone, client_ip)
        if not await self.db.run(
            queries.claim_code, phone, purpose, code_hash, checks, self.rules.max_attempts, now, used
        ):
            raise InvalidCode(field="code")

    async def register(
        self,
        raw_phone: Any,
        password: str,
        code: str,
        client_ip: str,
        *,
        user_agent: str | None = None,
        lang: str | None = None,
    ) -> Grant:
        """A new account; its session's H5 ticket carries ``lang`` (the app's language) to the pages."""
        phone = self.phone(raw_phone)
        check_password_policy(password)
        checks, now = self._code_checks(client_ip), self.clock.now()
        await self._claim_code(phone, "regist", code, checks, now, client_ip)
        password_hash = await self.db.offloader.cpu(self.passwords.hash, password)
        public_id, (token, ticket, grant) = tokens.new_public_id(), self._new_grant(now, client_ip, user_agent, lang)
        dormant_before = self.dormant_before(now)
        try:
            session_id = await self.db.run(
                queries.register, public_id, phone, password_hash, checks, now, grant, now, dormant_before
            )
        except Conflict:  # another request registered the phone first
            raise PhoneTaken(field="phone") from None
        user = {"id": public_id, "phone": phone, "created_at": isoformat(now)}
        return self._grant(user, token, ticket, session_id)

    def login_windows(self, phone: str, client_ip: str) -> LoginWindows:
        """Where a login attempt counts.

        Guessing is bounded without letting strangers lock the owner out: one client (an address, an
        IPv6 /64) gets ``login_phone_failures`` tries per phone and ``login_ip_failures`` over all phones
        per window, then waits for the window's end. All clients together get ``login_slowdown_after``
        tries per phone per window, then the phone is slowed down, not locked: one attempt per
        ``login_slowdown`` seconds, whoever makes it. So guesses per phone stay under
        ``login_slowdown_after + login_window / login_slowdown`` per window. A client that signed in to
        the phone within ``TRUST_SECONDS`` (``known_client``) is not slowed down (its own per-phone limit
        still holds): strangers never slow the owner on a known client. From a new client the owner
        takes a turn with the strangers, who can hold every turn for a while; a password reset clears
        the phone's counters (and the clients it knew)."""
        r, client = self.rules, ratelimit.client_key(client_ip)
        return LoginWindows(
            by_client=Window(f"login:ip:{client}", r.login_ip_failures, r.login_window),
            by_phone=Window(_login_phone_key(phone), r.login_slowdown_after, r.login_window),
            by_phone_client=Window(f"{_login_phone_key(phone)}:from:{client}", r.login_phone_failures, r.login_window),
            pace=Window(f"{_login_phone_key(phone)}:pace", 1, r.login_slowdown),
        )

    def known_client(self, phone: str, client_ip: str) -> Window:
        """Where a client's successful logins to ``phone`` are remembered (see login_windows)."""
        return Window(f"{_login_phone_key(phone)}:from:{ratelimit.client_key(client_ip)}:ok", 1, TRUST_SECONDS)

    def _login_params(self, phone: str, client_ip: str, now: dt.datetime) -> tuple[dict[str, Any], dict[str, Any]]:
        """The parameters of a login attempt's windows (to count, and give back when it succeeds), and
        those of the windows read with them (the client's remembered successes)."""
        counted = ratelimit.window_params(self.login_windows(phone, client_ip), now)
        known, later = self.known_client(phone, client_ip), now + dt.timedelta(seconds=TRUST_SECONDS)
        remembered = {
            **ratelimit.window_params([known], now, queries.TRUSTED),
            **ratelimit.window_params([known], later, queries.TRUSTED_NEXT),
        }
        return counted, remembered

    async def _reserve_attempt(self, phone: str, client_ip: str, now: dt.datetime) -> tuple[Row, dict[str, Any]]:
        """Count a password check for ``phone`` as a login attempt, before the password is checked (a
        refused attempt counts nowhere: RateLimited); the user by phone (``LOGIN_LOOKUP``'s row) and
        the parameters of the windows counted (to give the attempt back when it succeeds)."""
        windows = self.login_windows(phone, client_ip)
        counted, remembered = self._login_params(phone, client_ip, now)
        found = await self.db.run(
            queries.reserve_login,
            phone,
            {**counted, **remembered},
            lambda found: _admit_login(windows, found, now),
            now,
        )
        return found, counted

    async def login(
        self, raw_phone: Any, password: str, client_ip: str, *, user_agent: str | None = None, lang: str | None = None
    ) -> Grant:
        phone = self.phone(raw_phone)
        now = self.clock.now()
        found, counted = await self._reserve_attempt(phone, client_ip, now)
        # Unknown phone: the hasher verifies against a decoy, so both failures cost the same time.
        ok = await self.db.offloader.cpu(self.passwords.verify, found.password_hash, password)
        frozen = False
        if not ok or found.id is None:
            # The latest account frozen off this number (recycled) may be the caller's. Every failure
            # takes this second look and a second hash (on a decoy when there is none), so the time tells
            # nobody whether the number was ever recycled.
            former = await self.db.run(queries.frozen_account, phone, now)
            ok = await self.db.offloader.cpu(self.passwords.verify, former.password_hash if former else None, password)
            if not ok or former is None:
                raise InvalidCredentials()  # already counted
            found, frozen = found._replace(**former._asdict()), True
        if found.disabled:
            # Only one who proved the password learns it (a stranger gets the 401 of any wrong
            # password): the owner is told to contact support rather than reset a good password.
            raise AccountDisabled()
        new_hash = None
        if self.passwords.needs_rehash(found.password_hash):
            new_hash = await self.db.offloader.cpu(self.passwords.hash, password)
        grant = await self._record_login(found, new_hash, counted, phone, client_ip, user_agent, now, frozen, lang=lang)
        if grant is None:
            raise InvalidCredentials()  # the password changed since it was verified: no session
        return grant

    async def login_with_code(
        self, raw_phone: Any, code: str, client_ip: str, *, user_agent: str | None = None, lang: str | None = None
    ) -> Grant:
        """Sign in with a ``login`` code sent to the phone instead of the password: counted in the login's
        windows as a password is (a wrong code is a failed login, and a wrong guess at the code). A
        phone without an account got no code: any code is wrong for it, with the same answer
        (``400 invalid_code``), the same steps and no hash on either side."""
        if not self.rules.sms_login:
            raise InvalidField(N_("Signing in with an SMS code is turned off here; send the password."), field="code")
        phone = self.phone(raw_phone)
        now = self.clock.now()
        windows = self.login_windows(phone, client_ip)
        counted, remembered = self._login_params(phone, client_ip, now)
        found = await self.db.run(
            queries.reserve_code_login,
            phone,
            {**counted, **remembered},
            lambda found: _admit_login(windows, found, now),
            tokens.keyed_digest(self.code_key, phone, "login", code),
            self.rules.max_attempts,
            now,
            self.cost_guard.use_guard(phone, client_ip),
        )
        if found is None:
            raise InvalidCode(field="code")  # already counted
        grant = await self._record_login(
            found, None, counted, phone, client_ip, user_agent, now, by_code=True, lang=lang
        )
        if grant is None:
            raise InvalidCode(field="code")  # reset or deleted for good since the code was checked
        return grant

    async def _record_login(
        self,
        found: Row,
        new_hash: str | None,
        counted: dict[str, Any],
        phone: str,
        client_ip: str,
        user_agent: str | None,
        now: dt.datetime,
        frozen: bool = False,
        by_code: bool = False,
        lang: str | None = None,
    ) -> Grant | None:
        """A good login of ``found`` (``frozen``: an account frozen off ``phone``): its session (it undoes a
        deletion in its grace period), or None when the password changed, or the deletion became final,
        since ``found`` was read. A login with a code (``by_code``) signs in to the number's account as
        it is then: a fresh one when it was dormant (see queries.free_number)."""
        # A good login is not a failure: its attempt is given back, and it clears this client's earlier
        # failures for the phone; the client is remembered (once per TRUST_SECONDS, not every login).
        windows = self.login_windows(phone, client_ip)
        known, later = self.known_client(phone, client_ip), now + dt.timedelta(seconds=TRUST_SECONDS)
        forget = windows.by_phone_client.key if found.by_phone_client_count > 1 else None
        remember = None
        if found.trusted_next is None:
            remember = {**ratelimit.window_params([known], now), **ratelimit.window_params([known], later, 1)}
        token, ticket, grant = self._new_grant(now, client_ip, user_agent, lang)
        if by_code:
            fresh_hash, dormant_before = await self.fresh_hash(), self.dormant_before(now)
            done = await self.db.run(
                queries.record_code_login, found, counted, forget, remember, grant, now, dormant_before, fresh_hash
            )
            session_id, found = done if done is not None else (None, found)
        else:
            session_id = await self.db.run(queries.record_login, found, new_hash, counted, forget, remember, grant, now)
        if session_id is None:
            return None
        user = public_user(found, frozen=frozen)
        return self._grant(user, token, ticket, session_id, bool(found.deletion_pending))

    async def logout(self, principal: Principal) -> None:
        await self.db.run(queries.revoke_session, principal.session_id, self.clock.now())

    async def reset_password(self, raw_phone: Any, code: str, password: str, client_ip: str) -> None:
        phone = self.phone(raw_phone)
        check_password_policy(password)
        checks, now = self._code_checks(client_ip), self.clock.now()
        await self._claim_code(phone, "reset", code, checks, now, client_ip)
        password_hash = await self.db.offloader.cpu(self.passwords.hash, password)
        # The owner proved who they are: failures of strangers no longer slow their logins down. A
        # dormant account is not handed over: the number's holder gets a fresh account with the password.
        family, dormant_before = _login_phone_key(phone), self.dormant_before(now)
        if not await self.db.run(
            queries.reset_password, phone, password_hash, checks, now, family, now, dormant_before
        ):
            raise InvalidCode(field="code")  # deleted since the code was sent

    # -- tokens --------------------------------------------------------------------------------

    async def authenticate(self, token: str) -> Principal:
        """The caller behind a bearer token, or Unauthorized (missing, unknown, expired, revoked)."""
        if not tokens.looks_like_token(token):
            raise Unauthorized()
        now = self.clock.now()
        row = await self.db.run(queries.session_of_token, tokens.digest(token), now, now - TOUCH_EVERY)
        if row is None:
            raise Unauthorized()
        return Principal(user_id=row.user_id, session_id=row.id, phone=row.phone, frozen=bool(row.frozen))

    async def profile(self, principal: Principal) -> dict[str, Any]:
        user = await self.db.run(queries.profile, principal.user_id)
        if user is None:
            raise Unauthorized()  # deleted since the token was checked
        return profile_body(user)

    def _new_grant(
        self, now: dt.datetime, client_ip: str, user_agent: str | None, lang: str | None = None
    ) -> tuple[str, str, queries.NewGrant]:
        """The secrets of a new app session and of its first H5 ticket, and what to store of them (with
        the device as the list of sessions shows it, and the app's language for the H5 pages)."""
        token, token_hash = tokens.new_secret()
        ticket, ticket_hash, ticket_expires_at = new_ticket(now, self.rules.h5_ticket_ttl)
        expires_at = now + dt.timedelta(seconds=self.rules.token_ttl)
        grant = queries.NewGrant(
            token_hash,
            expires_at,
            ticket_hash,
            ticket_expires_at,
            user_agent=clean_user_agent(user_agent),
            ip=coarse_ip(client_ip),
            lang=self.languages.pick(lang),
        )
        return token, ticket, grant

    def _grant(
        self, user: dict[str, Any], token: str, ticket: str, session_id: int, deletion_cancelled: bool = False
    ) -> Grant:
        return Grant(
            user=user,
            token=token,
            expires_in=self.rules.token_ttl,
            session_id=session_id,
            h5_ticket=ticket,
            deletion_cancelled=deletion_cancelled,
        )

    # -- the list of sessions (devices) -----------------------------------------------------------

    async def sessions(self, principal: Principal) -> list[dict[str, Any]]:
        """The caller's live sessions, the most recently used first (at most queries.SESSIONS_LISTED)."""
        rows = await self.db.run(queries.list_sessions, principal.user_id, self.clock.now())
        return [
            {
                "id": row.public_id,
                "created_at": isoformat(row.created_at),
                "last_used_at": isoformat(row.last_used_at),
                "user_agent": row.user_agent,
                "ip": row.ip,
                "current": row.id == principal.session_id,
            }
            for row in rows
        ]

    async def end_session(self, principal: Principal, public_id: str) -> None:
        """End one of the caller's sessions (the current one too: that is a logout); NotFound for an id
        that is not a live session of theirs, whoever's it is."""
        if not await self.db.run(queries.end_session, principal.user_id, public_id, self.clock.now()):
            raise NotFound(N_("No such session."))

    async def end_other_sessions(self, principal: Principal) -> None:
        """Sign out every session of the caller but the current one."""
        await self.db.run(queries.end_other_sessions, principal.user_id, principal.session_id, self.clock.now())

    # -- password and phone changes ---------------------------------------------------------------

    async def _check_password(
        self, principal: Principal, password: str, client_ip: str, field: str, now: dt.datetime
    ) -> tuple[Row, dict[str, Any]]:
        """The caller's password check, limited and answered as a login with it is (InvalidCredentials,
        RateLimited): the user's row and the attempt's windows, to give back once the change is done."""
        found, counted = await self._reserve_attempt(principal.phone, client_ip, now)
        if principal.frozen:  # the number's account is another's: check the caller's own password
            own = await self.db.run(queries.account, principal.user_id)
            found = found._replace(id=own.id, password_hash=own.password_hash) if own else found
        ok = await self.db.offloader.cpu(self.passwords.verify, found.password_hash, password)
        if not ok or found.id != principal.user_id:  # the phone changed hands since the token check
            raise InvalidCredentials(N_("Wrong password."), field=field)  # already counted
        return found, counted

    async def change_password(self, principal: Principal, old_password: str, password: str, client_ip: str) -> None:
        """Replace the caller's password (``old_password`` checked as a login checks it); every other
        session ends. Of changes made at once, one wins; the others find the old password wrong."""
        check_password_policy(password)
        now = self.clock.now()
        found, counted = await self._check_password(principal, old_password, client_ip, "old_password", now)
        new_hash = await self.db.offloader.cpu(self.passwords.hash, password)
        user_id, session_id = principal.user_id, principal.session_id
        if not await self.db.run(
            queries.change_password, user_id, session_id, found.password_hash, new_hash, counted, now
        ):
            raise InvalidCredentials(N_("Wrong password."), field="old_password")  # changed since it was checked

    async def change_phone(
        self, principal: Principal, raw_phone: Any, code: str, password: str, client_ip: str, lang: str | None = None
    ) -> dict[str, Any]:
        """Move the caller's account to a new phone, proved by a ``phone`` code sent to it, and the
        password; the old phone gets a notice. The code is checked first (a wrong one costs no hash),
        then the password as a login checks it; a phone another account has is PhoneTaken, whatever
        made it taken (held at the code request: no code was sent; registered since: the database's
        unique key). A dormant account's number is taken over: that account is frozen."""
        phone = self.phone(raw_phone)
        if phone == principal.phone and not principal.frozen:
            raise InvalidPhone(N_("This is already your phone number."), field="phone")
        checks, now = self._code_checks(client_ip), self.clock.now()
        await self._claim_code(phone, "phone", code, checks, now, client_ip)
        found, counted = await self._check_password(principal, password, client_ip, "password", now)
        # A frozen account moves off no number (and unfreezes): its old one is another account's now.
        old_phone = None if principal.frozen else principal.phone
        notice = None
        if old_phone is not None:
            lang = self.languages.pick(lang)  # the mover's: the old number is theirs too
            notice = queries.Notice(
                old_phone, "phone_notice", self._notice_text(old_phone, lang), now + NOTICE_TTL, lang
            )
        try:
            user = await self.db.run(
                queries.change_phone,
                principal.user_id,
                principal.session_id,
                old_phone,
                phone,
                found.password_hash,
                checks,
                now,
                counted,
                notice,
                now,
                self.dormant_before(now),
            )
        except Conflict:
            raise PhoneTaken(field="phone") from None
        if user is None:
            raise InvalidCredentials(N_("Wrong password."), field="password")  # changed since it was checked
        self.sender.wake()
        return profile_body(user)

    # -- account deletion -----------------------------------------------------------------------------

    async def delete_account(
        self, principal: Principal, *, password: str | None, code: str | None, client_ip: str
    ) -> dt.datetime:
        """Schedule the deletion of the caller's account, proved by the password (checked as a login
        checks it) or by a ``delete`` code sent to the account's phone (checked as a registration's
        code); every session ends at once. The time the deletion becomes final: until then a login
        undoes it, after it housekeeping purges the account."""
        if (password is None) == (code is None):
            raise InvalidField(
                N_("Send either 'password' or 'code'."), field="password" if password is None else "code"
            )
        now = self.clock.now()
        due_at = now + dt.timedelta(seconds=self.rules.deletion_grace)
        verified_hash, refunds = None, []
        if code is not None and principal.frozen:
            raise InvalidField(
                N_("This account has no phone number to send a code to; send the password."), field="code"
            )
        if code is not None:
            checks = self._code_checks(client_ip)
            await self._claim_code(principal.phone, "delete", code, checks, now, client_ip)
            refunds.append((ratelimit.window_params([checks], now), 1))  # only failed checks count
        else:
            assert password is not None
            found, counted = await self._check_password(principal, password, client_ip, "password", now)
            verified_hash = found.password_hash
            refunds.append((counted, queries.LOGIN_WINDOWS))  # a good password is not a failed login
        user_id, session_id = principal.user_id, principal.session_id
        if not await self.db.run(queries.schedule_deletion, user_id, session_id, verified_hash, refunds, due_at, now):
            raise InvalidCredentials(N_("Wrong password."), field="password")  # changed since it was checked
        return due_at

    def _notice_text(self, old_phone: str, lang: str) -> str | None:
        """The text telling the old phone that the account left it (None: not texted, as test numbers
        and numbers in countries texts no longer go to are not)."""
        if old_phone in self.test_numbers:
            return None
        try:
            require_region(old_phone, self.rules.sms_regions)
        except InvalidPhone:
            return None
        return self.languages.translate(lang, texts.MOVED)


def _login_phone_key(phone: str) -> str:
    return queries.login_phone_key(phone)


def _admit_login(windows: LoginWindows, found: Row, now: dt.datetime) -> None:
    """Refuse an attempt that one of ``windows`` does not allow (``found``: queries.LOGIN_LOOKUP's row)."""
    ratelimit.refuse_if_over(windows.by_client, found.by_client_count, now)
    ratelimit.refuse_if_over(windows.by_phone_client, found.by_phone_client_count, now)
    # The phone is slowed down, not locked; never for a client that signed in to it before.
    if found.by_phone_count > windows.by_phone.limit and found.trusted is None:
        ratelimit.refuse_if_over(windows.pace, found.pace_count, now)


def profile_body(user: Row) -> dict[str, Any]:
    """The profile as the contract shows it (``queries.PROFILE``'s row)."""
    return {
        **public_user(user, frozen=bool(user.frozen)),
        "last_login_at": isoformat(user.last_login_at),
        "image_count": user.image_count,
    }


def public_user(user: Any, *, frozen: bool = False) -> dict[str, Any]:
    """The user as the contract shows it: the random public id, never the internal sequential one. A
    frozen account shows the number it had (and signs in with), and ``"frozen": true``."""
    body = {"id": user.public_id, "phone": user.phone, "created_at": isoformat(user.created_at)}
    return {**body, "frozen": True} if frozen else body
