"""Password policy and hashing (argon2id, parameters at or above OWASP's recommendation).

Hashing is CPU-heavy and runs on the CPU thread pool; argon2-cffi releases the GIL while it works.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from demo.common.errors import WeakPassword
from demo.common.i18n import N_

MIN_LENGTH, MAX_LENGTH = 8, 128
OWASP_MIN_MEMORY_KIB, OWASP_MIN_TIME_COST = 19456, 2


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """20,000 most common passwords (Django's list, BSD licence), shipped in the package."""
    data = resources.files("demo.common.accounts").joinpath("data/common-passwords.txt.gz").read_bytes()
    return frozenset(line.strip() for line in gzip.decompress(data).decode().splitlines() if line.strip())


def check_password_policy(password: str) -> None:
    """NIST-style: length only (no composition rules), and not one of the common passwords."""
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise WeakPassword(field="password")
    if password.lower().strip() in common_passwords():
        raise WeakPassword(N_("This password is too common; choose another."), field="password")


class Passwords:
    """argon2id hashing with a fixed decoy hash so unknown phones cost as much as wrong passwords."""

    def __init__(self, time_cost: int, memory_kib: int, parallelism: int) -> None:
        """The settings' argon2_time_cost, argon2_memory_kib and argon2_parallelism."""
        if memory_kib < OWASP_MIN_MEMORY_KIB or time_cost < OWASP_MIN_TIME_COST:
            raise ValueError("argon2 parameters below OWASP's minimum (memory >= 19456 KiB, time >= 2)")
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._decoy: str | None = None

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches. With no stored hash, burn the same time on a decoy."""
        if stored_hash is None:
            if self._decoy is None:
                self._decoy = self._hasher.hash("decoy password, never matches anything real")
            stored_hash, password = self._decoy, password + "\0"
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)
