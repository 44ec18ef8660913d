"""The words of the account texts (SMS), as catalogue msgids, and the autofill lines of a text with a code.

The rules (rules.py) choose the text and render it in the requester's language (common/i18n.py). A text
with a code may end with two machine-read lines (settings ``sms_android_app_hash``, ``sms_otp_origin``):

- Android's SMS Retriever API hands a text to the app whose 11-character signature hash it contains,
  without the SMS permission (developers.google.com/identity/sms-retriever/verify);
- the origin-bound one-time code format (wicg.github.io/sms-one-time-codes): the last line is
  ``@<host> #<code>``, which iOS and browsers (WebOTP) offer to fill in only on that site and the apps
  associated with it, so a phishing page cannot get the code autofilled.

Texts without a code (the notices) get neither: there is nothing to fill in.
"""

from __future__ import annotations

import re

from demo.common.i18n import N_

# What each purpose's code text says ({code}, {minutes}); other purposes get CODE.
CODE = N_("Your demo verification code is {code}. It expires in {minutes} minutes.")
CODE_TEXTS = {
    "delete": N_(
        "Your demo code to DELETE your account is {code}. It expires in {minutes} minutes."
        " If you did not ask for it, ignore this text and never share the code."
    ),
    "login": N_("Your demo sign-in code is {code}. It expires in {minutes} minutes. Never share it."),
}
# Notices: no code in them.
REGISTERED = N_("This number already has a demo account. Sign in, or reset your password.")
PHONE_TAKEN = N_("This number already has a demo account, so no account can be moved to it.")
MOVED = N_("The demo account of this number was moved to another number. If you did not do this, contact support.")

# The hash is the first 11 characters of the base64 (standard alphabet, no padding) of a SHA-256.
_APP_HASH = re.compile(r"[A-Za-z0-9+/]{11}")
# A DNS host name of two labels or more (LDH rule, RFC 1123): the spec's host is that of an https origin,
# written without scheme, port or path. An IDN is written in its A-label (xn--) form.
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST = re.compile(rf"{_LABEL}(\.{_LABEL})+")


def android_app_hash(value: str) -> str:
    """The setting ``sms_android_app_hash`` as written into texts ("" = none); ValueError otherwise."""
    if value and not _APP_HASH.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an app hash: 11 characters of A-Z, a-z, 0-9, '+' and '/' "
            "(the SMS Retriever API's AppSignatureHelper prints it)"
        )
    return value


def otp_origin(value: str) -> str:
    """The setting ``sms_otp_origin`` as written into texts (lower case; "" = none); ValueError otherwise."""
    host = value.lower()
    if host and (len(host) > 253 or not _HOST.fullmatch(host) or host.rsplit(".", 1)[1].isdigit()):
        raise ValueError(
            f"{value!r} is not a host name such as example.com (no scheme, port, path or IP address; "
            "an international name in its xn-- form)"
        )
    return host


def with_autofill(text: str, code: str, *, app_hash: str, origin: str) -> str:
    """``text`` followed by the app-hash line and, as the very last line, ``@<origin> #<code>``
    (each only when set). The origin line must be last, start with '@', and have exactly one space
    before '#': the spec's parser reads nothing else."""
    lines = [text]
    if app_hash:
        lines.append(app_hash)
    if origin:
        lines.append(f"@{origin} #{code}")
    return "\n".join(lines)
