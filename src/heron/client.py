"""A small client of Heron's HTTP API for the CLI (`heron agents …`, later `heron chat`).

It finds the server in HERON_URL (default http://127.0.0.1:8000) and the key in HERON_API_KEY,
falling back to the key that the first start saved under HERON_HOME.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx


class ApiError(Exception):
    """A failed call, as one line: the Problem Details `detail` when the server sent one."""


def default_url() -> str:
    return os.environ.get("HERON_URL", "http://127.0.0.1:8000").rstrip("/")


def default_key() -> str | None:
    key = os.environ.get("HERON_API_KEY")
    if key:
        return key
    saved = Path(os.environ.get("HERON_HOME", "~/.heron")).expanduser() / "initial-api-key"
    return saved.read_text().strip() if saved.is_file() else None


class HeronClient:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 60) -> None:
        key = key or default_key()
        if not key:
            raise ApiError("no API key: set HERON_API_KEY (or pass --key)")
        self.url = (url or default_url()).rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def __enter__(self) -> HeronClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach Heron at {self.url}: {exc}") from None
        if response.is_error:
            raise ApiError(_describe(response))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def paginate(self, path: str, **params: Any) -> list[Any]:
        items: list[Any] = []
        cursor: str | None = None
        while True:
            page = self.json(
                "GET",
                path,
                params={**params, "limit": 100, **({"cursor": cursor} if cursor else {})},
            )
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items


def _describe(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict) and "detail" in body:
        return f"{body.get('title', 'error')} ({response.status_code}): {body['detail']}"
    return f"HTTP {response.status_code}"
