"""Every ORM model, imported in one place so Alembic and the mappers see all tables."""

from heron.db.base import Base
from heron.providers.models import Provider
from heron.tenancy.models import ApiKey, Membership, User, Workspace

__all__ = ["ApiKey", "Base", "Membership", "Provider", "User", "Workspace"]
