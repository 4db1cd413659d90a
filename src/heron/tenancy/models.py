"""Workspaces, users, their memberships and API keys."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import Enum, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from heron.db.base import Base, IdMixin, TimestampMixin, WorkspaceOwned


class Role(enum.StrEnum):
    """What a member or key may do in its workspace, from most to least powerful."""

    owner = "owner"
    admin = "admin"
    member = "member"
    viewer = "viewer"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def at_least(self, other: Role) -> bool:
        return self.rank >= other.rank


_RANKS = {Role.owner: 3, Role.admin: 2, Role.member: 1, Role.viewer: 0}

_role_type = Enum(Role, name="role", native_enum=False, length=16, validate_strings=True)


class Workspace(IdMixin, TimestampMixin, Base):
    __tablename__ = "workspaces"

    name: Mapped[str] = mapped_column(String(200))
    # Lets tools such as http_fetch reach loopback and private addresses (off by default).
    allow_private_network: Mapped[bool] = mapped_column(default=False)


class User(IdMixin, TimestampMixin, Base):
    __tablename__ = "users"

    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    # None: the account cannot log in with a password (e.g. the bootstrap owner, until set).
    password_hash: Mapped[str | None] = mapped_column(String(200))
    is_active: Mapped[bool] = mapped_column(default=True)


class Membership(WorkspaceOwned):
    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("workspace_id", "user_id"),)

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[Role] = mapped_column(_role_type)

    user: Mapped[User] = relationship(lazy="raise")


class ApiKey(WorkspaceOwned):
    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(200))
    # The public part of the key, used to find its row; the secret part is only hashed.
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(128))
    role: Mapped[Role] = mapped_column(_role_type)
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
