"""Domain errors. Plain Python: the web layer (web/errors.py) maps each ``code`` to an HTTP status."""

from __future__ import annotations


class DemoError(Exception):
    """An error the client caused or can act on. ``code`` is the contract's snake_case error code."""

    code = "error"
    message = "Request failed."

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.field = field

    def headers(self) -> dict[str, str]:
        """Extra response headers the client needs to act on this error."""
        return {}


class InvalidJson(DemoError):
    code, message = "invalid_json", "The body is not a JSON object."


class InvalidField(DemoError):
    code, message = "invalid_field", "A field is missing, of the wrong type, or out of range."


class InvalidPhone(DemoError):
    code, message = "invalid_phone", "Not a valid mobile number."


class WeakPassword(DemoError):
    code, message = "weak_password", "Choose a password of 8 to 128 characters that is not a common one."


class InvalidCode(DemoError):
    code, message = "invalid_code", "The code is wrong, expired or already used."


class PhoneTaken(DemoError):
    code, message = "phone_taken", "This phone number already has an account."


class InvalidCredentials(DemoError):
    code, message = "invalid_credentials", "Wrong phone number or password."


class Unauthorized(DemoError):
    code, message = "unauthorized", "Sign in again: the token is missing, expired or revoked."


class AccountDisabled(DemoError):
    code, message = "account_disabled", "This account is disabled; contact support."


class NotFound(DemoError):
    code, message = "not_found", "Not found."


class TooLarge(DemoError):
    code, message = "too_large", "The upload is too large."


class UnsupportedMediaType(DemoError):
    code, message = "unsupported_media_type", "Only JPEG, PNG, GIF and WebP images are accepted."


class InvalidImage(DemoError):
    code, message = "invalid_image", "The image is corrupt, truncated or too large in pixels."


class QuotaExceeded(DemoError):
    code, message = "quota_exceeded", "Your image quota is used up."


class RateLimited(DemoError):
    code, message = "rate_limited", "Too many requests; retry later."

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RangeNotSatisfiable(DemoError):
    code, message = "range_not_satisfiable", "The requested range lies outside the file."

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


class InsufficientStorage(DemoError):
    code, message = "insufficient_storage", "The server is out of storage space; retry later."


class Unavailable(DemoError):
    code, message = "unavailable", "The service is temporarily unavailable; retry later."


class SmsBudgetSpent(Unavailable):
    """The deployment's daily SMS budget is spent: texts stop until it resets (fails closed)."""

    message = "Texts are paused for now; retry later."

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
