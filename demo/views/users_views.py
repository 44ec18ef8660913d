"""Accounts handlers: read the JSON fields, call demo.common.accounts.rules, write the contract's JSON."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from tornado.iostream import StreamClosedError

from demo.common.accounts.export import Exports
from demo.common.accounts.rules import Grant
from demo.common.errors import InvalidField
from demo.common.i18n import N_
from demo.common.infra.clock import isoformat
from demo.common.web.api import ApiHandler, text_field
from demo.common.web.auth import public, requires_session

log = logging.getLogger("demo.accounts")


class AccountsHandler(ApiHandler):
    @property
    def user_agent(self) -> str | None:
        """The client's User-Agent, for the list of sessions."""
        return self.request.headers.get("User-Agent")

    def session_body(self, grant: Grant) -> dict[str, Any]:
        return {
            "user": grant.user,
            "token": grant.token,
            "token_type": "Bearer",
            "expires_in": grant.expires_in,
            "h5_url": self.h5_url(grant.h5_ticket),
        }


class CodeHandler(AccountsHandler):
    @public
    async def post(self) -> None:
        """Send an SMS code for registration, password reset, a phone change, a login or a deletion."""
        body = self.json_body()
        phone = text_field(body, "phone", max_length=32)
        purpose = text_field(body, "purpose", default="regist", max_length=16)
        self.write_json(await self.accounts.request_code(phone, purpose, self.client_ip, self.language))


class RegistHandler(AccountsHandler):
    @public
    async def post(self) -> None:
        """Create an account from phone, password and SMS code; answer with a session."""
        body = self.json_body()
        phone = text_field(body, "phone", max_length=32)
        password = text_field(body, "password", max_length=4096)
        code = text_field(body, "code", max_length=16)
        grant = await self.accounts.register(
            phone, password, code, self.client_ip, user_agent=self.user_agent, lang=self.language
        )
        self.write_json(self.session_body(grant), status=201)


class LoginHandler(AccountsHandler):
    @public
    async def post(self) -> None:
        """Exchange phone and password, or phone and a ``login`` SMS code, for a bearer token."""
        body = self.json_body()
        phone = text_field(body, "phone", max_length=32)
        if "code" in body and "password" in body:
            raise InvalidField(N_("Send either 'password' or 'code', not both."), field="code")
        if "code" in body:
            code = text_field(body, "code", max_length=16)
            grant = await self.accounts.login_with_code(
                phone, code, self.client_ip, user_agent=self.user_agent, lang=self.language
            )
        else:
            password = text_field(body, "password", max_length=4096)
            grant = await self.accounts.login(
                phone, password, self.client_ip, user_agent=self.user_agent, lang=self.language
            )
        # Only a login can undo a deletion: the client tells its user the account is back.
        self.write_json({**self.session_body(grant), "deletion_cancelled": grant.deletion_cancelled})


class LogoutHandler(AccountsHandler):
    @requires_session
    async def post(self) -> None:
        """Revoke the calling token."""
        await self.accounts.logout(self.principal)
        self.set_status(204)
        self.finish()


class PasswordResetHandler(AccountsHandler):
    @public
    async def post(self) -> None:
        """Set a new password with a reset code; every session of the user ends."""
        body = self.json_body()
        phone = text_field(body, "phone", max_length=32)
        code = text_field(body, "code", max_length=16)
        password = text_field(body, "password", max_length=4096)
        await self.accounts.reset_password(phone, code, password, self.client_ip)
        self.set_status(204)
        self.finish()


class MeHandler(AccountsHandler):
    @requires_session
    async def get(self) -> None:
        """The calling user's profile."""
        self.write_json({"user": await self.accounts.profile(self.principal)})

    @requires_session
    async def delete(self) -> None:
        """Schedule the deletion of the account, proved by the password or a ``delete`` code; 202."""
        body = self.json_body()
        password = text_field(body, "password", max_length=4096) if "password" in body else None
        code = text_field(body, "code", max_length=16) if "code" in body else None
        final_at = await self.accounts.delete_account(
            self.principal, password=password, code=code, client_ip=self.client_ip
        )
        self.write_json({"final_at": isoformat(final_at)}, status=202)


class PasswordChangeHandler(AccountsHandler):
    @requires_session
    async def post(self) -> None:
        """Replace the password, given the current one; every other session ends."""
        body = self.json_body()
        old_password = text_field(body, "old_password", max_length=4096)
        password = text_field(body, "password", max_length=4096)
        await self.accounts.change_password(self.principal, old_password, password, self.client_ip)
        self.set_status(204)
        self.finish()


class PhoneChangeHandler(AccountsHandler):
    @requires_session
    async def post(self) -> None:
        """Move the account to a new phone, with a ``phone`` code sent to it and the password."""
        body = self.json_body()
        phone = text_field(body, "phone", max_length=32)
        code = text_field(body, "code", max_length=16)
        password = text_field(body, "password", max_length=4096)
        user = await self.accounts.change_phone(self.principal, phone, code, password, self.client_ip, self.language)
        self.write_json({"user": user})


class SessionsHandler(AccountsHandler):
    @requires_session
    async def get(self) -> None:
        """The caller's live sessions (devices), the most recently used first."""
        self.write_json({"sessions": await self.accounts.sessions(self.principal)})

    @requires_session
    async def delete(self) -> None:
        """Sign out every other session of the caller."""
        await self.accounts.end_other_sessions(self.principal)
        self.set_status(204)
        self.finish()


class SessionHandler(AccountsHandler):
    @requires_session
    async def delete(self, session_id: str) -> None:
        """End one of the caller's sessions (404 for any id that is not one of theirs)."""
        await self.accounts.end_session(self.principal, session_id)
        self.set_status(204)
        self.finish()


class ExportHandler(AccountsHandler):
    @requires_session
    async def get(self) -> None:
        """A zip of the caller's data (profile.json and every original image), streamed as it is built."""
        exports = Exports(self.services.db, self.services.store, self.services.clock)
        export = await exports.prepare(self.principal)  # the hourly limit is counted here, before any work
        self.set_header("Content-Type", "application/zip")
        self.set_header("Content-Disposition", f'attachment; filename="{export.filename}"')
        sent = False
        async with contextlib.aclosing(exports.stream(export)) as pieces:
            try:
                async for piece in pieces:
                    self.write(piece)
                    await self.flush()  # waits for the client to take it: one piece in memory at a time
                    sent = True
            except StreamClosedError:
                return  # the client left: nobody to answer
            except Exception as error:
                if not sent:  # nothing went out: the error map's answer
                    raise
                # The headers are gone: only a cut connection tells the client the zip is incomplete
                # (finishing would end the chunked body as if it were whole).
                log.warning("export of user %s cut after its headers went: %r", self.principal.user_id, error)
                self.request.connection.close()  # type: ignore[union-attr]
                return
        self.finish()
