"""Liveness, readiness and metrics for operators and orchestrators."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from heron.core.errors import problem_response, problem_responses
from heron.db.engine import Database
from heron.ops.metrics import render_metrics

router = APIRouter(tags=["operations"])
CHECK_TIMEOUT = 2.0


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


@router.get("/healthz", summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="The database (and Redis, when configured) answer",
    responses=problem_responses(503),
)
async def readyz(request: Request) -> Response:
    checks: dict[str, str] = {}
    db: Database = request.app.state.db
    try:
        await asyncio.wait_for(db.ping(), CHECK_TIMEOUT)
        checks["database"] = "ok"
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        checks["database"] = f"failed: {type(exc).__name__}"
    redis: Redis | None = request.app.state.redis
    if redis is not None:
        try:
            await asyncio.wait_for(redis.ping(), CHECK_TIMEOUT)
            checks["redis"] = "ok"
        except (RedisError, OSError, TimeoutError) as exc:
            checks["redis"] = f"failed: {type(exc).__name__}"
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        return problem_response(
            getattr(request.state, "request_id", None),
            status=503,
            slug="not-ready",
            title="Not ready",
            detail=f"Not reachable: {', '.join(failed)}.",
            checks=checks,
        )
    return Response(
        Health(status="ok", checks=checks).model_dump_json(), media_type="application/json"
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
