"""Request and response bodies of workspaces, members, API keys and the current caller."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import EmailStr, Field, StringConstraints

from heron.core.schemas import RequestModel, ResponseModel
from heron.tenancy.models import Role

Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Password = Annotated[str, StringConstraints(min_length=8, max_length=1024, strip_whitespace=False)]


class WorkspaceCreate(RequestModel):
    name: Name


class WorkspaceUpdate(RequestModel):
    name: Name | None = None
    allow_private_network: bool | None = Field(
        None, description="Let tools reach loopback and private network addresses."
    )


class WorkspaceOut(ResponseModel):
    id: uuid.UUID
    name: str
    role: Role = Field(description="The caller's role in this workspace.")
    allow_private_network: bool
    created_at: datetime
    updated_at: datetime


class UserOut(ResponseModel):
    id: uuid.UUID
    email: str
    name: str
    created_at: datetime


class MemberCreate(RequestModel):
    email: EmailStr
    role: Role = Role.member
    name: Annotated[str, StringConstraints(max_length=200)] = ""
    password: Password | None = Field(
        None, description="Creates the account with this password when no user has the email."
    )


class MemberUpdate(RequestModel):
    role: Role


class MemberOut(ResponseModel):
    user_id: uuid.UUID
    email: str
    name: str
    role: Role
    created_at: datetime


class ApiKeyCreate(RequestModel):
    name: Name
    role: Role = Role.member
    expires_at: datetime | None = Field(None, description="UTC time after which the key fails.")


class ApiKeyUpdate(RequestModel):
    name: Name


class ApiKeyOut(ResponseModel):
    id: uuid.UUID
    name: str
    prefix: str
    role: Role
    created_by: uuid.UUID | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The key itself. Shown only in this response.")


class CallerOut(ResponseModel):
    user: UserOut | None
    workspace_id: uuid.UUID
    role: Role
    api_key_id: uuid.UUID | None
