"""pydantic-ai models built from a workspace's provider connections.

A model reference is `provider-name:model-name`, split on the first colon
(`local-ollama:qwen3:8b` is model `qwen3:8b` of provider `local-ollama`).

HTTP clients come from an `HttpClients`: a process gives every runtime the same one, so runs reuse
kept-alive connections and never build a TLS context of their own (that costs tens of
milliseconds of CPU, on the event loop); a runtime made without one has private clients, closed
with it. Clients are shared between connections whose client settings (headers, timeout, retry
policy) are equal; credentials and base URLs belong to the providers, not the clients, and the
clients keep no cookies, so nothing of one connection's requests reaches another's.

Transient failures are retried below the SDK, in the HTTP transport, by pydantic-ai's tenacity
transport: 408, 429, 5xx and connection errors, with exponential backoff and jitter, honouring
`Retry-After`. The SDKs' own retries are turned off (`max_retries=0`) so a request is never retried
at two levels. What still fails after the retries moves a `FallbackModel` on to its next model
when it is the provider's fault (5xx, timeouts, rate limits, unreachable) and not when the request
itself was refused (400, 401, 404...).
"""

from __future__ import annotations

import ssl
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import httpx2
from pydantic_ai.exceptions import (
    ModelConnectionError,
    ModelQuotaExceededError,
    ModelRateLimitError,
    ModelRequestTimeout,
    ModelServerError,
    ModelUnavailableError,
)
from pydantic_ai.messages import ModelResponse
from pydantic_ai.models import Model, create_async_httpx2_client
from pydantic_ai.models.fallback import FallbackModel
from pydantic_ai.retries import (
    AsyncHTTPX2TenacityTransport,
    AsyncTenacityTransport,
    RetryConfig,
    wait_retry_after,
)
from pydantic_ai.settings import ModelSettings
from tenacity import retry_if_exception, stop_after_attempt, wait_exponential_jitter

from heron.core.errors import FieldError, ValidationFailed
from heron.providers.connection import ProviderConnection
from heron.providers.models import ProviderKind

if TYPE_CHECKING:
    from openai import AsyncOpenAI

# Statuses worth sending the same request again for: the provider may answer differently soon.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

# What moves a FallbackModel to its next model: the provider failed, not the request.
PROVIDER_FAILURES: tuple[type[Exception], ...] = (
    ModelServerError,  # 500, 502, 504 and other 5xx
    ModelUnavailableError,  # 503, 529 (overloaded)
    ModelRateLimitError,  # 429
    ModelQuotaExceededError,  # 402, exhausted credits: another account may have some
    ModelConnectionError,  # refused, reset, DNS, and transport timeouts (ModelTimeoutError)
    ModelRequestTimeout,  # ModelSettings request deadlines
)


@dataclass(frozen=True)
class RetryPolicy:
    """How one HTTP request to a provider is retried; waits are in seconds."""

    attempts: int = 4  # tries in all, the first included
    initial_wait: float = 0.5
    max_wait: float = 30.0
    jitter: float = 1.0
    max_retry_after: float = 120.0  # the longest `Retry-After` honoured
    sleep: Callable[[float], Awaitable[None]] | None = None  # tests observe waits through it


NO_RETRY = RetryPolicy(attempts=1)

# As pydantic-ai's and the SDKs' own clients: many runs of a process share one client.
_LIMITS = {"max_connections": 1000, "max_keepalive_connections": 100}
MODELS_KEPT = 256


class HttpClients:
    """HTTP clients to model providers, shared by the runtimes given this object; each is made on
    first use and lives until `aclose()` (a process closes it when it stops)."""

    def __init__(self) -> None:
        self._clients: dict[tuple[Any, ...], httpx2.AsyncClient | httpx.AsyncClient] = {}
        self._tls: ssl.SSLContext | None = None
        # Models built over these clients, by everything they were built from: a model holds
        # no state of a request, and building one (its SDK client) costs a quarter of a
        # millisecond of every run's time to first token. A changed connection (key, URL,
        # headers) is another entry; the least recently used go beyond MODELS_KEPT.
        self._models: OrderedDict[tuple[Any, ...], Model] = OrderedDict()

    def model(
        self,
        connection: ProviderConnection,
        model_name: str,
        retry: RetryPolicy,
        build: Callable[[], Model],
    ) -> Model:
        """The model `build()` makes for this connection, model name and retry policy, made
        once."""
        key = (
            connection.name,
            connection.kind,
            connection.base_url,
            connection.api_key,
            *_client_key(connection, retry),
            model_name,
        )
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = build()
            while len(self._models) > MODELS_KEPT:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(key)
        return model

    def tls(self) -> ssl.SSLContext:
        """One TLS context for every client: building one is slow, using one is not."""
        if self._tls is None:
            self._tls = httpx2.create_ssl_context()
        return self._tls

    def httpx2(self, connection: ProviderConnection, retry: RetryPolicy) -> httpx2.AsyncClient:
        key = ("httpx2", *_client_key(connection, retry))
        client = self._clients.get(key)
        if isinstance(client, httpx2.AsyncClient):
            return client
        transport: httpx2.AsyncBaseTransport = httpx2.AsyncHTTPTransport(
            verify=self.tls(), limits=httpx2.Limits(**_LIMITS)
        )
        if retry.attempts > 1:
            transport = AsyncHTTPX2TenacityTransport(
                _retry_config(retry, httpx2.HTTPStatusError, httpx2.TransportError),
                wrapped=_ReadRetryableBodies(transport),
                validate_response=_raise_for_retryable_status,
            )
        # The URL comes from a workspace admin and may be private (Ollama on localhost):
        # reaching it is the point of an openai-compatible connection, so nothing filters it.
        client = create_async_httpx2_client(timeout=_timeout(connection), transport=transport)
        client.headers.update(connection.headers)
        client.cookies = _no_cookies()  # a jar that refuses every cookie
        self._clients[key] = client
        return client

    def httpx(self, connection: ProviderConnection, retry: RetryPolicy) -> httpx.AsyncClient:
        """The Groq SDK still takes a legacy `httpx` client, with pydantic-ai's legacy transport."""
        key = ("httpx", *_client_key(connection, retry))
        client = self._clients.get(key)
        if isinstance(client, httpx.AsyncClient):
            return client
        transport: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(
            verify=self.tls(), limits=httpx.Limits(**_LIMITS)
        )
        if retry.attempts > 1:
            with warnings.catch_warnings():
                # Deprecated with legacy httpx itself, which is all the groq SDK accepts.
                warnings.simplefilter("ignore")
                legacy: AsyncTenacityTransport = AsyncTenacityTransport(
                    _retry_config(retry, httpx.HTTPStatusError, httpx.TransportError),
                    wrapped=_ReadRetryableBodiesLegacy(transport),
                    validate_response=_raise_for_retryable_status,
                )
            transport = legacy
        t = connection.timeout_seconds
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(t, connect=min(t, 10.0)),
            transport=transport,
            headers=connection.headers,
            cookies=_no_cookies(),
            verify=self.tls(),
        )
        self._clients[key] = client
        return client

    async def aclose(self) -> None:
        self._models.clear()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _client_key(connection: ProviderConnection, retry: RetryPolicy) -> tuple[Any, ...]:
    return (tuple(sorted(connection.headers.items())), connection.timeout_seconds, retry)


def _no_cookies() -> CookieJar:
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


class UnknownModelReference(ValidationFailed):
    """A model reference that is malformed or names no provider of the workspace."""


@dataclass(frozen=True)
class ModelRef:
    provider: str
    model: str

    @classmethod
    def parse(cls, value: str, *, field: str = "model") -> ModelRef:
        provider, colon, model = value.partition(":")
        if not colon or not provider or not model:
            raise _unknown(
                field, f"{value!r} is not a model reference like `provider-name:model-name`."
            )
        return cls(provider, model)

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"


class ModelRuntime:
    """Builds models for one unit of work (a run, a check) and owns their HTTP clients.

    ```python
    async with ModelRuntime(connections) as runtime:
        model = runtime.fallback_model("openai:gpt-4o", ["local-ollama:qwen3:8b"])
        result = await Agent(model).run("Hello")
        runtime.answered_by(result.response)  # ModelRef of whichever model answered
    ```
    """

    def __init__(
        self,
        connections: Iterable[ProviderConnection],
        *,
        retry: RetryPolicy = RetryPolicy(),
        clients: HttpClients | None = None,
    ) -> None:
        self._connections = {c.name: c for c in connections}
        self._retry = retry
        self._owns_clients = clients is None
        self._clients = clients if clients is not None else HttpClients()
        self._built: list[tuple[ModelRef, Model]] = []

    async def __aenter__(self) -> ModelRuntime:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_clients:
            await self._clients.aclose()

    def model(self, ref: str | ModelRef, *, field: str = "model") -> Model:
        """The model a reference names. Raises UnknownModelReference naming `field`."""
        if isinstance(ref, str):
            ref = ModelRef.parse(ref, field=field)
        connection = self._connections.get(ref.provider)
        if connection is None:
            raise _unknown(field, f"There is no provider named {ref.provider!r} in this workspace.")
        name = ref.model
        model = self._clients.model(
            connection, name, self._retry, lambda: self._build(connection, name)
        )
        self._built.append((ref, model))
        return model

    def fallback_model(
        self,
        primary: str | ModelRef,
        fallbacks: Sequence[str | ModelRef] = (),
        *,
        field: str = "model",
        fallbacks_field: str = "fallback_models",
    ) -> Model:
        """`primary`, then each of `fallbacks` in turn when the one before failed by the
        provider's fault (see PROVIDER_FAILURES); a refused request fails at once. Without
        fallbacks, the primary model itself (a FallbackModel of one only adds its cost: about
        half a millisecond per request)."""
        models = [self.model(primary, field=field)]
        models += [
            self.model(ref, field=f"{fallbacks_field}.{i}") for i, ref in enumerate(fallbacks)
        ]
        if len(models) == 1:
            return models[0]
        return FallbackModel(*models, fallback_on=PROVIDER_FAILURES)

    def answered_by(self, response: ModelResponse) -> ModelRef | None:
        """Which of the models this runtime built produced `response`.

        Told by the provider name and base URL pydantic-ai records on each response
        (`provider_name`, `provider_url`); `response.model_name` is what the provider reports,
        often a dated version of the name asked for.
        """
        matches = [
            ref
            for ref, model in self._built
            if model.system == response.provider_name
            and _same_url(model.base_url, response.provider_url)
        ]
        if len(matches) > 1 and response.model_name:
            exact = [ref for ref in matches if response.model_name.startswith(ref.model)]
            matches = exact or matches
        return matches[0] if matches else None

    # Building -----------------------------------------------------------------------------

    def _build(self, connection: ProviderConnection, model_name: str) -> Model:
        # Each kind's SDK is imported only when a model of that kind is built: they are large.
        kind, endpoint, key = connection.kind, connection.endpoint, connection.api_key
        # The SDKs' own retries are off. The Stainless SDKs' (OpenAI, Groq, Anthropic) in their
        # clients, made here: given `max_retries` in its settings, pydantic-ai would send every
        # request through a fresh copy of the client (`with_options`), which also looks up the
        # platform again for its headers, on a worker thread: a tenth to a third of a
        # millisecond per request for nothing. The others take it per request.
        settings = ModelSettings(timeout=connection.timeout_seconds)
        if kind in (ProviderKind.google, ProviderKind.mistral):
            settings["max_retries"] = 0
        if kind in (ProviderKind.openai, ProviderKind.openai_compatible):
            from pydantic_ai.models.openai import OpenAIChatModel
            from pydantic_ai.providers.openai import OpenAIProvider
            from pydantic_ai.providers.openai_compatible import OpenAICompatibleProvider

            client = self._openai_client(connection)
            if kind == ProviderKind.openai:
                openai = OpenAIProvider(openai_client=client)
                return OpenAIChatModel(model_name, provider=openai, settings=settings)
            # Named after the connection, so responses say which connection answered.
            compatible = OpenAICompatibleProvider(connection.name, openai_client=client)
            return OpenAIChatModel(model_name, provider=compatible, settings=settings)
        if kind == ProviderKind.openrouter:
            from pydantic_ai.models.openrouter import OpenRouterModel
            from pydantic_ai.providers.openrouter import OpenRouterProvider

            # OpenRouterProvider takes no base URL; a client made here can have one.
            router = OpenRouterProvider(openai_client=self._openai_client(connection))
            return OpenRouterModel(model_name, provider=router, settings=settings)
        if kind == ProviderKind.anthropic:
            from anthropic import AsyncAnthropic
            from pydantic_ai.models.anthropic import AnthropicModel
            from pydantic_ai.providers.anthropic import AnthropicProvider

            anthropic = AnthropicProvider(
                anthropic_client=AsyncAnthropic(
                    api_key=key,
                    base_url=endpoint,
                    http_client=self._httpx2_client(connection),
                    max_retries=0,
                )
            )
            return AnthropicModel(model_name, provider=anthropic, settings=settings)
        if kind == ProviderKind.google:
            from pydantic_ai.models.google import GoogleModel
            from pydantic_ai.providers.google import GoogleProvider

            google = GoogleProvider(
                api_key=key, base_url=endpoint, http_client=self._httpx2_client(connection)
            )
            return GoogleModel(model_name, provider=google, settings=settings)
        if kind == ProviderKind.groq:
            from pydantic_ai.models.groq import GroqModel
            from pydantic_ai.providers.groq import GroqProvider

            from heron.providers.groq_client import PassthroughGroq

            # Messages and tools sent past the SDK's transform (heron.providers.sdkbody).
            groq_client = PassthroughGroq(
                base_url=endpoint,
                api_key=key or "api-key-not-set",
                http_client=self._httpx_client(connection),
                max_retries=0,
            )
            groq = GroqProvider(groq_client=groq_client)
            return GroqModel(model_name, provider=groq, settings=settings)
        if kind == ProviderKind.mistral:
            from pydantic_ai.models.mistral import MistralModel
            from pydantic_ai.providers.mistral import MistralProvider

            mistral = MistralProvider(
                api_key=key, base_url=endpoint, http_client=self._httpx2_client(connection)
            )
            return MistralModel(model_name, provider=mistral, settings=settings)
        raise AssertionError(f"unhandled provider kind {kind}")

    def _openai_client(self, connection: ProviderConnection) -> AsyncOpenAI:
        """The OpenAI SDK client of an OpenAI-style connection: one that sends a request's
        messages and tools without the SDK's transform (heron.providers.sdkbody). A
        connection without a key sends a placeholder, as pydantic-ai's providers do: the
        server's own `OPENAI_API_KEY` is never picked up for it."""
        from heron.providers.openai_client import PassthroughOpenAI

        return PassthroughOpenAI(
            base_url=connection.endpoint,
            api_key=connection.api_key or "api-key-not-set",
            http_client=self._httpx2_client(connection),
            max_retries=0,
        )

    def _httpx2_client(self, connection: ProviderConnection) -> httpx2.AsyncClient:
        return self._clients.httpx2(connection, self._retry)

    def _httpx_client(self, connection: ProviderConnection) -> httpx.AsyncClient:
        return self._clients.httpx(connection, self._retry)


def _retry_config(policy: RetryPolicy, *transient: type[Exception]) -> RetryConfig:
    def is_transient(exc: BaseException) -> bool:
        # validate_response raises HTTPStatusError only for RETRYABLE_STATUSES.
        return isinstance(exc, transient)

    config = RetryConfig(
        retry=retry_if_exception(is_transient),
        wait=wait_retry_after(
            fallback_strategy=wait_exponential_jitter(
                initial=policy.initial_wait, max=policy.max_wait, jitter=policy.jitter
            ),
            max_wait=policy.max_retry_after,
        ),
        stop=stop_after_attempt(policy.attempts),
        reraise=True,
    )
    if policy.sleep is not None:
        config["sleep"] = policy.sleep
    return config


def _raise_for_retryable_status(response: httpx2.Response | httpx.Response) -> None:
    if response.status_code in RETRYABLE_STATUSES:
        response.raise_for_status()


class _ReadRetryableBodies(httpx2.AsyncBaseTransport):
    """Reads the body of a response that is about to be retried, so that when the retries run
    out the error still carries the provider's own explanation."""

    def __init__(self, wrapped: httpx2.AsyncBaseTransport) -> None:
        self._wrapped = wrapped

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._wrapped.handle_async_request(request)
        if response.status_code in RETRYABLE_STATUSES:
            await response.aread()
        return response

    async def aclose(self) -> None:
        await self._wrapped.aclose()


class _ReadRetryableBodiesLegacy(httpx.AsyncBaseTransport):
    def __init__(self, wrapped: httpx.AsyncBaseTransport) -> None:
        self._wrapped = wrapped

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._wrapped.handle_async_request(request)
        if response.status_code in RETRYABLE_STATUSES:
            await response.aread()
        return response

    async def aclose(self) -> None:
        await self._wrapped.aclose()


def _timeout(connection: ProviderConnection) -> httpx2.Timeout:
    seconds = connection.timeout_seconds
    return httpx2.Timeout(seconds, connect=min(seconds, 10.0))


def _same_url(a: str | None, b: str | None) -> bool:
    def normal(url: str | None) -> tuple[str, str, int | None, str] | None:
        if not url:
            return None
        parts = urlsplit(url)
        return (parts.scheme, parts.hostname or "", parts.port, parts.path.rstrip("/"))

    return normal(a) == normal(b)


def _unknown(field: str, message: str) -> UnknownModelReference:
    loc: list[str | int] = [int(p) if p.isdigit() else p for p in field.split(".")]
    return UnknownModelReference(
        f"{field}: {message}", errors=[FieldError(loc=loc, msg=message, type="model_reference")]
    )


__all__ = [
    "NO_RETRY",
    "PROVIDER_FAILURES",
    "RETRYABLE_STATUSES",
    "HttpClients",
    "ModelRef",
    "ModelRuntime",
    "RetryPolicy",
    "UnknownModelReference",
]
