"""Passwords (argon2id), API keys (random, stored as SHA-256 with a lookup prefix), session
tokens (JWT, HS256) and the instance secret they derive from."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from heron.core.ids import utcnow

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
# Verified against when the account doesn't exist, so a login takes as long either way.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))

KEY_PREFIX = "heron"
_ALPHABET = string.ascii_letters + string.digits


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class NewApiKey:
    token: str  # shown to the user once
    prefix: str  # stored, used to find the row
    key_hash: str  # stored


def generate_api_key() -> NewApiKey:
    prefix = secrets.token_hex(6)
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(43))  # ~256 bits
    token = f"{KEY_PREFIX}_{prefix}_{secret}"
    return NewApiKey(token=token, prefix=prefix, key_hash=hash_api_key(token))


def hash_api_key(token: str) -> str:
    # Keys carry 256 random bits, so a fast hash is safe here (as GitHub and Stripe do).
    return hashlib.sha256(token.encode()).hexdigest()


def parse_api_key(token: str) -> str | None:
    """The lookup prefix of a well-formed key, or None."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12:
        return None
    return parts[1]


def api_key_matches(stored_hash: str, token: str) -> bool:
    return hmac.compare_digest(stored_hash, hash_api_key(token))


def load_or_create_secret_key(home: Path) -> str:
    """The embedded mode's secret key: generated once into `$HERON_HOME/secret.key` (0600)."""
    path = home / "secret.key"
    if path.exists():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def derive_key(secret: str, purpose: str) -> bytes:
    """A separate 32-byte key per purpose, so one use never weakens another."""
    return hmac.new(secret.encode(), f"heron:{purpose}".encode(), hashlib.sha256).digest()


TokenType = Literal["access", "refresh"]


@dataclass(frozen=True)
class TokenClaims:
    user_id: uuid.UUID
    type: TokenType
    expires_at: datetime


class TokenSigner:
    def __init__(self, secret: str, *, access_seconds: int, refresh_seconds: int) -> None:
        self._key = derive_key(secret, "jwt")
        self._ttl = {
            "access": timedelta(seconds=access_seconds),
            "refresh": timedelta(seconds=refresh_seconds),
        }

    def issue(self, user_id: uuid.UUID, type: TokenType) -> tuple[str, datetime]:
        now = utcnow()
        expires = now + self._ttl[type]
        claims: dict[str, Any] = {
            "sub": str(user_id),
            "typ": type,
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
            "jti": secrets.token_hex(8),
            "iss": "heron",
        }
        return jwt.encode(claims, self._key, algorithm="HS256"), expires

    def verify(self, token: str, type: TokenType) -> TokenClaims | None:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                issuer="heron",
                options={"require": ["sub", "exp", "typ"]},
            )
            if claims.get("typ") != type:
                return None
            return TokenClaims(
                user_id=uuid.UUID(str(claims["sub"])),
                type=type,
                expires_at=datetime.fromtimestamp(int(claims["exp"]), tz=utcnow().tzinfo),
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            return None
