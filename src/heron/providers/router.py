"""HTTP endpoints of provider connections. Anyone in the workspace may read them (credentials are
never shown); only admins create, change, delete or check them, since they hold credentials and
checking spends them."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Request, status

from heron.core.auth import Admin, Reader
from heron.core.crypto import SecretBox
from heron.core.errors import problem_responses
from heron.core.pagination import Page, PageQuery, make_page
from heron.core.routing import JsonRoute
from heron.db.session import DbSession, get_database
from heron.providers import service
from heron.providers.models import Provider
from heron.providers.repository import ProviderRepository
from heron.providers.schemas import (
    CheckError,
    CheckResult,
    ModelList,
    ProviderCheck,
    ProviderCreate,
    ProviderOut,
    ProviderUpdate,
)

router = APIRouter(
    prefix="/api/providers",
    tags=["providers"],
    route_class=JsonRoute,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429),
)


def _box(request: Request) -> SecretBox:
    box: SecretBox = request.app.state.secret_box
    return box


def _out(row: Provider, box: SecretBox) -> ProviderOut:
    return ProviderOut(
        id=row.id,
        name=row.name,
        kind=row.kind,
        base_url=row.base_url,
        api_key_masked=service.mask_api_key(box.decrypt_optional(row.api_key_encrypted)),
        extra_header_names=sorted(service.decrypt_headers(box, row.headers_encrypted)),
        timeout_seconds=row.timeout_seconds,
        models=row.models,
        models_checked_at=row.models_checked_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@router.get("", summary="List the provider connections of the current workspace")
async def list_providers(
    request: Request, session: DbSession, principal: Reader, page: PageQuery
) -> Page[ProviderOut]:
    box = _box(request)
    rows = await ProviderRepository(session, principal.workspace_id).page(page)
    return make_page(list(rows), page, lambda r: _out(r, box), lambda r: r.id)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Add a provider connection (its credentials are stored encrypted)",
)
async def create_provider(
    request: Request, session: DbSession, principal: Admin, body: ProviderCreate
) -> ProviderOut:
    box = _box(request)
    fields = service.ProviderFields(
        name=body.name,
        kind=body.kind,
        base_url=body.base_url,
        api_key=body.api_key.get_secret_value() if body.api_key else None,
        extra_headers=body.extra_headers,
        timeout_seconds=body.timeout_seconds,
    )
    row = await service.create_provider(session, principal.workspace_id, box, fields)
    return _out(row, box)


@router.get("/{provider_id}", summary="Get a provider connection")
async def get_provider(
    request: Request, session: DbSession, principal: Reader, provider_id: uuid.UUID
) -> ProviderOut:
    row = await ProviderRepository(session, principal.workspace_id).get_or_404(provider_id)
    return _out(row, _box(request))


@router.patch("/{provider_id}", summary="Change a provider connection")
async def update_provider(
    request: Request,
    session: DbSession,
    principal: Admin,
    provider_id: uuid.UUID,
    body: ProviderUpdate,
) -> ProviderOut:
    box = _box(request)
    given = body.model_fields_set
    u = service.UNCHANGED
    fields = service.ProviderFields(
        # name, kind and timeout can't be cleared: null leaves them as they are.
        name=body.name if body.name is not None else u,
        kind=body.kind if body.kind is not None else u,
        base_url=body.base_url if "base_url" in given else u,
        api_key=(body.api_key.get_secret_value() if body.api_key else None)
        if "api_key" in given
        else u,
        extra_headers=body.extra_headers if "extra_headers" in given else u,
        timeout_seconds=body.timeout_seconds if body.timeout_seconds is not None else u,
    )
    row = await service.update_provider(session, principal.workspace_id, box, provider_id, fields)
    return _out(row, box)


@router.delete(
    "/{provider_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a provider connection",
)
async def delete_provider(session: DbSession, principal: Admin, provider_id: uuid.UUID) -> None:
    repo = ProviderRepository(session, principal.workspace_id)
    await repo.delete(await repo.get_or_404(provider_id))


@router.post(
    "/{provider_id}/check",
    summary="Check a provider connection by calling it",
    description="Lists the provider's models with the stored credentials and, when `model` is "
    "given, asks that model for one token. A failed check is still a 200: `ok` is false and "
    "`error.code` says what failed. The models listed are remembered on the connection.",
)
async def check_provider(
    request: Request,
    session: DbSession,
    principal: Admin,
    provider_id: uuid.UUID,
    body: Annotated[ProviderCheck | None, Body()] = None,
) -> CheckResult:
    from heron.providers.check import check_connection

    row = await ProviderRepository(session, principal.workspace_id).get_or_404(provider_id)
    connection = service.connection_of(row, _box(request))
    # End the request's transaction before calling out: on SQLite it holds the database's write
    # lock, which no one else should wait for while a provider takes its time to answer. The
    # write below starts a new transaction, committed with the request as usual.
    await session.commit()
    outcome = await check_connection(connection, body.model if body else None)
    if outcome.listed:
        await service.record_models(session, principal.workspace_id, provider_id, outcome.models)
    return CheckResult.model_validate(outcome)


@router.get(
    "/{provider_id}/models",
    summary="List the models a provider offers",
    description="Asks the provider now. When it can't be reached, answers the list it gave last "
    "time with `live: false` and the `error`, rather than failing.",
)
async def list_provider_models(
    request: Request, session: DbSession, principal: Reader, provider_id: uuid.UUID
) -> ModelList:
    from heron.providers.check import ProviderFailure, list_models

    row = await ProviderRepository(session, principal.workspace_id).get_or_404(provider_id)
    connection = service.connection_of(row, _box(request))
    await session.commit()  # no transaction stays open while the provider answers
    try:
        models = await list_models(connection)
    except ProviderFailure as failure:
        return ModelList(
            models=row.models or [],
            live=False,
            checked_at=row.models_checked_at,
            error=CheckError.model_validate(failure.error),
        )
    # A read request has a read-only transaction; remembering the list takes a short write one.
    async with get_database(request).session(write=True) as writer, writer.begin():
        checked_at = await service.record_models(
            writer, principal.workspace_id, provider_id, models
        )
    return ModelList(models=models, live=True, checked_at=checked_at, error=None)
