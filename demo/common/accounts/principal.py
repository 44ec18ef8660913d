"""Who is calling: shared by the accounts, H5 and image rules and by the handlers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    user_id: int
    session_id: int  # the app session (bearer token) this call rides on, directly or through H5
    phone: str  # a frozen account's is the number it had, and signs in with: another account has it now
    h5_session_id: int | None = None  # set when the call came with the H5 cookie
    frozen: bool = False  # the account's number went to a new holder (recycled): no codes reach it
    lang: str | None = None  # an H5 session's: the language its pages are in (None: the default)
