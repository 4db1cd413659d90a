"""Request and response bodies of logins and session tokens."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import StringConstraints

from heron.core.schemas import RequestModel, ResponseModel
from heron.tenancy.models import Role
from heron.tenancy.schemas import UserOut


class LoginRequest(RequestModel):
    email: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    password: Annotated[
        str, StringConstraints(min_length=1, max_length=1024, strip_whitespace=False)
    ]


class RefreshRequest(RequestModel):
    refresh_token: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class WorkspaceRole(ResponseModel):
    id: uuid.UUID
    name: str
    role: Role


class TokenPair(ResponseModel):
    token_type: Literal["bearer"] = "bearer"  # noqa: S105
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int
    user: UserOut
    workspaces: list[WorkspaceRole]
