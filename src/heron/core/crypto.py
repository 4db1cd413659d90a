"""Encryption at rest for the secrets Heron stores (provider API keys, extra headers, ...).

A SecretBox is Fernet (AES-128-CBC with HMAC-SHA256, from `cryptography`) keyed by a key derived
from HERON_SECRET_KEY for this purpose alone, so the session-signing key and the encryption key
never coincide. A column that holds SecretBox output is declared with `encrypted_column_info()`,
which is how `heron secrets rotate` finds every value it has to re-encrypt.
"""

from __future__ import annotations

import base64
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import Column, MetaData, Table, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from heron.core.errors import HeronError
from heron.core.security import derive_key

ENCRYPTED = "heron_encrypted"


class SecretUndecryptable(HeronError):
    """A stored secret doesn't open with the current key: HERON_SECRET_KEY changed without
    `heron secrets rotate`, or the value was written by another installation."""

    status, slug, title = 500, "secret-undecryptable", "Stored secret cannot be decrypted"


class SecretBox:
    """Encrypts and decrypts short strings with a key derived from the instance secret."""

    def __init__(self, secret: str) -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(derive_key(secret, "secrets")))

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, UnicodeEncodeError):
            raise SecretUndecryptable(
                "A stored secret cannot be decrypted with the current HERON_SECRET_KEY: the key "
                "was changed without `heron secrets rotate`. Restore the previous key, then rotate."
            ) from None

    def encrypt_optional(self, plaintext: str | None) -> str | None:
        return None if plaintext is None else self.encrypt(plaintext)

    def decrypt_optional(self, token: str | None) -> str | None:
        return None if token is None else self.decrypt(token)


def encrypted_column_info() -> dict[str, Any]:
    """`info=` for a column holding SecretBox tokens: rotation re-encrypts every such column."""
    return {ENCRYPTED: True}


def encrypted_columns(metadata: MetaData) -> dict[Table, list[Column[Any]]]:
    """Every table with encrypted columns, and those columns."""
    found: dict[Table, list[Column[Any]]] = {}
    for table in metadata.sorted_tables:
        columns = [c for c in table.columns if c.info.get(ENCRYPTED)]
        if columns:
            found[table] = columns
    return found


async def reencrypt_all(
    session: AsyncSession, metadata: MetaData, old: SecretBox, new: SecretBox
) -> int:
    """Decrypt every encrypted value with `old` and write it back encrypted with `new`.

    Runs in the caller's transaction, so a value that doesn't decrypt (SecretUndecryptable) leaves
    everything as it was. Returns the number of values re-encrypted.
    """
    count = 0
    for table, columns in encrypted_columns(metadata).items():
        key = list(table.primary_key.columns)
        rows = (await session.execute(select(*key, *columns))).all()
        for row in rows:
            values: dict[str, Any] = {
                column.name: new.encrypt(old.decrypt(value))
                for column, value in zip(columns, row[len(key) :], strict=True)
                if value is not None
            }
            if not values:
                continue
            if "updated_at" in table.c:  # a re-encryption is not a change anyone made
                values["updated_at"] = table.c.updated_at
            where = [k == row[i] for i, k in enumerate(key)]
            await session.execute(update(table).where(*where).values(values))
            count += len(columns) - sum(value is None for value in row[len(key) :])
    return count
