"""Opaque values handed to clients: secrets (bearer tokens, H5 tickets; random, only their digest
stored) and public ids (random, so they tell nothing: not how many there are, nor in which order)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_BYTES = 32  # 256 random bits, URL-safe base64 in transit


def new_secret() -> tuple[str, str]:
    """A fresh secret and its SHA-256 (hex); store the digest, hand out the secret."""
    secret = secrets.token_urlsafe(TOKEN_BYTES)
    return secret, digest(secret)


def new_public_id() -> str:
    """128 random bits, 22 URL-safe characters: a user's id as clients see it."""
    return secrets.token_urlsafe(16)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keyed_digest(key: bytes, *parts: str) -> str:
    """HMAC-SHA256 over ``parts``: for low-entropy secrets (SMS codes) that a plain hash would not hide."""
    return hmac.new(key, "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()


def looks_like_token(value: str) -> bool:
    return 20 <= len(value) <= 128 and all(c.isalnum() or c in "-_" for c in value)
