"""Health, readiness and metrics."""

from __future__ import annotations

import httpx
import pytest

from conftest import Tenant, make_settings, serve
from heron.app import create_app
from heron.db.engine import Database


async def test_healthz_and_readyz(client: httpx.AsyncClient, scale_out: str | None) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok", "checks": {}}
    ready = (await client.get("/readyz")).json()
    assert ready["checks"]["database"] == "ok"
    if scale_out:
        assert ready["checks"]["redis"] == "ok"


async def test_readyz_names_what_failed(tmp_path, database_url) -> None:  # type: ignore[no-untyped-def]
    # Nothing listens on port 1: Redis is configured but unreachable.
    app = create_app(make_settings(tmp_path, database_url, "redis://127.0.0.1:1/0"))
    # (No worker: one can't take jobs from a Redis that isn't there.)
    async with serve(app, with_worker=False) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["detail"] == "Not reachable: redis."
        assert body["checks"]["database"] == "ok"
        assert (await client.get("/healthz")).status_code == 200


async def test_readyz_fails_when_the_database_goes_away(tmp_path, database_url) -> None:  # type: ignore[no-untyped-def]
    app = create_app(make_settings(tmp_path, database_url))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        # Point the app at a database nobody serves (port 1); lifespan still closes the real one.
        app.state.db = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert "database" in response.json()["detail"]


async def test_metrics_count_requests_by_route_template(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    key_id = (await client.get("/api/keys", headers=alice.headers)).json()["items"][0]["id"]
    await client.get(f"/api/keys/{key_id}", headers=alice.headers)
    await client.get("/api/definitely-unknown")
    text = (await client.get("/metrics")).text
    assert 'heron_http_requests_total{method="GET",route="/api/keys/{key_id}",status="200"}' in text
    assert 'route="<unmatched>",status="404"' in text
    assert key_id not in text
    assert (
        'heron_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/api/keys"}'
        in text
    )


async def test_openapi_and_docs_are_served(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "/api/workspaces" in spec["paths"]
    assert "Problem" in spec["components"]["schemas"]
    error = spec["paths"]["/api/keys"]["post"]["responses"]["422"]
    assert "application/problem+json" in error["content"]
    assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_logged_tracebacks_show_the_frames_but_never_their_locals(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error logged with its traceback names the code that failed, in both formats, and
    prints no frame's local variables (a key or token held in one would end up in the log)."""
    import logging

    import structlog

    from heron.core.logging import configure_logging

    def fail(api_key: str) -> None:
        raise RuntimeError("the provider refused")

    secret = "-".join(["sk", "live", "should", "never", "be", "logged"])  # not in any source line
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("info", fmt)
    try:
        try:
            fail(secret)
        except RuntimeError:
            structlog.get_logger("heron.test").exception("call_failed")
        err = capsys.readouterr().err
    finally:
        # The handler just made writes to this test's captured stderr, closed after it.
        root.handlers[:], level = saved
        root.setLevel(level)
    assert "call_failed" in err
    assert "the provider refused" in err
    assert "in fail" in err  # the frame that raised
    assert secret not in err
