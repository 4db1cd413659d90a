"""A provider connection with its credentials decrypted: what the model runtime and the connection
check work from. It never leaves the process (no HTTP response, no log line carries it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from heron.providers.models import ProviderKind

# Each kind's base URL as its SDK takes it. OpenAI-style kinds include the API version path
# (`.../v1`), as the OpenAI SDK does; the others are the host root, to which their SDKs add it.
DEFAULT_BASE_URLS: dict[ProviderKind, str] = {
    ProviderKind.openai: "https://api.openai.com/v1",
    ProviderKind.anthropic: "https://api.anthropic.com",
    ProviderKind.google: "https://generativelanguage.googleapis.com",
    ProviderKind.groq: "https://api.groq.com",
    ProviderKind.mistral: "https://api.mistral.ai",
    ProviderKind.openrouter: "https://openrouter.ai/api/v1",
}


@dataclass(frozen=True)
class ProviderConnection:
    name: str
    kind: ProviderKind
    base_url: str | None
    api_key: str | None = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    timeout_seconds: float = 60.0

    @property
    def endpoint(self) -> str:
        """The base URL requests go to: the configured one, else the kind's public endpoint."""
        if self.base_url:
            return self.base_url.rstrip("/")
        return DEFAULT_BASE_URLS[self.kind]
