"""Domain errors. Plain Python: the web layer (web/errors.py) maps each ``code`` to an HTTP status and
translates the message into the request's language.

Messages are msgids of the catalogue (demo/locale), marked with ``N_`` and never translated here: the
rules do not know who reads them. A message with values in it (a field's name, a limit) is a
template with ``{name}`` placeholders, and the values travel beside it in ``params``, so the
catalogue holds one entry per template, not one per value.
"""

from __future__ import annotations

from collections.abc import Mapping

from demo.common.i18n import N_


class DemoError(Exception):
    """An error the client caused or can act on. ``code`` is the contract's snake_case error code;
    ``message`` the English text (logs, ``str()``), ``template`` and ``params`` what it is made of."""

    code = "error"
    message = N_("Request failed.")

    def __init__(
        self, message: str | None = None, *, field: str | None = None, params: Mapping[str, object] | None = None
    ) -> None:
        self.template = message or self.message
        self.params = dict(params or {})
        self.message = self.template.format_map(self.params) if self.params else self.template
        super().__init__(self.message)
        self.field = field

    def headers(self) -> dict[str, str]:
        """Extra response headers the client needs to act on this error."""
        return {}


class InvalidJson(DemoError):
    code, message = "invalid_json", N_("The body is not a JSON object.")


class InvalidField(DemoError):
    code, message = "invalid_field", N_("A field is missing, of the wrong type, or out of range.")


class InvalidPhone(DemoError):
    code, message = "invalid_phone", N_("Not a valid mobile number.")


class WeakPassword(DemoError):
    code, message = "weak_password", N_("Choose a password of 8 to 128 characters that is not a common one.")


class InvalidCode(DemoError):
    code, message = "invalid_code", N_("The code is wrong, expired or already used.")


class PhoneTaken(DemoError):
    code, message = "phone_taken", N_("This phone number already has an account.")


class InvalidCredentials(DemoError):
    code, message = "invalid_credentials", N_("Wrong phone number or password.")


class Unauthorized(DemoError):
    code, message = "unauthorized", N_("Sign in again: the token is missing, expired or revoked.")


class AccountDisabled(DemoError):
    code, message = "account_disabled", N_("This account is disabled; contact support.")


class NotFound(DemoError):
    code, message = "not_found", N_("Not found.")


class TooLarge(DemoError):
    code, message = "too_large", N_("The upload is too large.")


class UnsupportedMediaType(DemoError):
    code, message = "unsupported_media_type", N_("Only JPEG, PNG, GIF and WebP images are accepted.")


class InvalidImage(DemoError):
    code, message = "invalid_image", N_("The image is corrupt, truncated or too large in pixels.")


class QuotaExceeded(DemoError):
    code, message = "quota_exceeded", N_("Your image quota is used up.")


class RateLimited(DemoError):
    code, message = "rate_limited", N_("Too many requests; retry later.")

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RangeNotSatisfiable(DemoError):
    code, message = "range_not_satisfiable", N_("The requested range lies outside the file.")

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


class InsufficientStorage(DemoError):
    code, message = "insufficient_storage", N_("The server is out of storage space; retry later.")


class Unavailable(DemoError):
    code, message = "unavailable", N_("The service is temporarily unavailable; retry later.")


class SmsBudgetSpent(Unavailable):
    """The deployment's daily SMS budget is spent: texts stop until it resets (fails closed)."""

    message = N_("Texts are paused for now; retry later.")

    def __init__(self, retry_after: int) -> None:
        super().__init__()
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class PrefixThrottled(RateLimited):
    """Texts to a number prefix whose codes go unused (SMS pumping) are throttled by the cost guard;
    ``burst``: refused because too many of its texts are too young to judge yet."""

    def __init__(self, retry_after: int, prefix: str, *, burst: bool = False) -> None:
        super().__init__(retry_after)
        self.prefix = prefix
        self.burst = burst
