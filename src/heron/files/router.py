"""HTTP endpoints of files. Anyone in the workspace may list and read them; members and above
upload and delete. Uploads are multipart/form-data with one `file` part, streamed to the blob
store as they arrive; downloads stream back as attachments, never rendered by the browser."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, status
from fastapi.responses import StreamingResponse

from heron.core.auth import Reader, Writer
from heron.core.errors import PayloadTooLarge, problem_responses
from heron.core.pagination import Page, PageQuery, make_page
from heron.core.routing import JsonRoute
from heron.db.session import DbSession, commit_now
from heron.files import service
from heron.files.models import File
from heron.files.multipart import MultipartUpload
from heron.files.schemas import FileOut
from heron.files.storage import BlobStore

# What a form may add around its file: boundaries, part headers, small fields. A request's
# Content-Length less this is the least its file can weigh.
FORM_OVERHEAD = 64 * 1024
# After a limit is hit, up to this much of the rest of the body is read and dropped, so the
# client (which may be sending all of it before reading) gets to read the 413.
DRAIN_BYTES = 8 * 1024 * 1024

router = APIRouter(
    prefix="/api/files",
    tags=["files"],
    route_class=JsonRoute,
    responses=problem_responses(400, 401, 403, 404, 422, 429),
)

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The file; its name is kept for display only.",
                        }
                    },
                }
            }
        },
    }
}


def _blobs(request: Request) -> BlobStore:
    blobs: BlobStore = request.app.state.blobs
    return blobs


def _out(row: File) -> FileOut:
    return FileOut.model_validate(row)


def upload_route_limit(max_file_bytes: int) -> int:
    """The request body limit of `POST /api/files`, for the size-limit middleware."""
    return max_file_bytes + FORM_OVERHEAD


@router.get("", summary="List the files of the current workspace")
async def list_files(session: DbSession, principal: Reader, page: PageQuery) -> Page[FileOut]:
    rows = await service.list_files(session, principal.workspace_id, page)
    return make_page(list(rows), page, _out, lambda r: r.id)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Upload a file",
    description="multipart/form-data with one `file` part. The content type is sniffed from "
    "the bytes. 413 when the file exceeds `HERON_STORAGE_MAX_FILE_BYTES` or the workspace's "
    "quota (`HERON_STORAGE_WORKSPACE_QUOTA_BYTES`); nothing is kept then.",
    openapi_extra=_UPLOAD_BODY,
    responses=problem_responses(413, 415),
)
async def upload_file(request: Request, session: DbSession, principal: Writer) -> FileOut:
    limits = service.FileLimits.from_settings(request.app.state.settings)
    blobs = _blobs(request)
    upload = MultipartUpload(request)
    space = await service.space_left(session, principal.workspace_id, limits)
    # No transaction stays open while the bytes arrive: on SQLite it would hold the write lock.
    await session.commit()
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        try:
            service.check_declared_size(int(declared) - FORM_OVERHEAD, limits, space)
        except PayloadTooLarge as exc:
            if int(declared) <= DRAIN_BYTES:
                await upload.drain(DRAIN_BYTES)
            else:
                exc.headers["Connection"] = "close"  # the body is not read
            raise
    try:
        name = await upload.open()
        stored = await service.store_content(
            blobs, principal.workspace_id, upload.chunks(), limits, space
        )
    except PayloadTooLarge:
        await upload.drain(DRAIN_BYTES)
        raise
    try:
        row = await service.record_file(
            session, blobs, limits, stored, name=name, created_by=principal.user_id
        )
        await commit_now(session)
    except BaseException:
        await service.discard(blobs, stored)
        raise
    return _out(row)


@router.get("/{file_id}", summary="Get a file's metadata")
async def get_file(session: DbSession, principal: Reader, file_id: uuid.UUID) -> FileOut:
    return _out(await service.get_file(session, principal.workspace_id, file_id))


@router.get(
    "/{file_id}/content",
    summary="Download a file's content",
    description="Streamed as an attachment with the sniffed content type.",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's bytes.",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def download_file(
    request: Request, session: DbSession, principal: Reader, file_id: uuid.UUID
) -> StreamingResponse:
    row, chunks = await service.open_content(
        session, _blobs(request), principal.workspace_id, file_id
    )
    return StreamingResponse(
        chunks,
        media_type=row.content_type,
        headers={
            "Content-Length": str(row.size),
            "Content-Disposition": content_disposition(row.name),
            "X-Content-Type-Options": "nosniff",
            # Even opened directly, the content runs no script and loads nothing.
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, no-cache",
            "ETag": f'"{row.sha256}"',
        },
    )


@router.delete(
    "/{file_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a file and its content",
)
async def delete_file(
    request: Request, session: DbSession, principal: Writer, file_id: uuid.UUID
) -> None:
    await service.delete_file(session, _blobs(request), principal.workspace_id, file_id)


def content_disposition(name: str) -> str:
    """`attachment` with an ASCII fallback name and the exact name per RFC 6266 / RFC 5987."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\;%' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
