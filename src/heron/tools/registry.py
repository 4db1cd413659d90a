"""The tools agents may call: a registry of named tools, each with a description and arguments.

A tool is a description the model reads, a pydantic model for its arguments (its JSON Schema is
what the model fills in; validation errors go back to the model to correct) and an async function
given a `ToolContext` and the validated arguments. Tools come from plugins, the built-ins too
(simonw/llm style): a plugin is a module with a `register_tools(registry)` function, listed in
`BUILTIN_PLUGINS` or passed to `load_plugins`.

Errors a tool raises for the model to read are `ToolInputError` (the arguments are wrong: correct
them and call again) and `ToolFailure` (the call failed: adapt). `heron.tools.toolset` turns
them into pydantic-ai's `ModelRetry` and `ToolFailed`.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, cached_property
from types import ModuleType
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import CoreSchema

from heron.core.errors import NotFound, ValidationFailed
from heron.core.ids import utcnow
from heron.core.netguard import FetchLimits, NetGuard

BUILTIN_PLUGINS = (
    "heron.tools.builtin.calculator",
    "heron.tools.builtin.current_time",
    "heron.tools.builtin.http_fetch",
    "heron.tools.builtin.search_knowledge",
)

ToolOutput: TypeAlias = str | dict[str, JsonValue]
"""What a tool returns to the model: text, or a JSON object."""

ArgsT = TypeVar("ArgsT", bound=BaseModel)

# The names OpenAI, Anthropic and Gemini all accept for a function.
_TOOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class ToolError(Exception):
    """An error whose message is for the model to read."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ToolInputError(ToolError):
    """The arguments are wrong; the model should correct them and call again."""


class ToolFailure(ToolError):
    """The call was understood but failed; calling again the same way will not help."""


class ToolNotFound(NotFound):
    slug, title = "tool-not-found", "Tool not found"


class UnknownTool(ValidationFailed):
    slug, title = "unknown-tool", "Unknown tool"


class ToolArguments(BaseModel):
    """Base for tool argument models: unknown arguments are errors the model gets to see."""

    model_config = ConfigDict(extra="forbid")


class KnowledgeSearch(Protocol):
    """The knowledge bases an agent may search (`heron.knowledge.service.AgentKnowledge`)."""

    async def search(
        self, query: str, *, top_k: int, knowledge_base: str | None
    ) -> list[dict[str, JsonValue]]:
        """Passages with their citations; ToolFailure when `knowledge_base` isn't one."""
        ...


@dataclass(frozen=True, kw_only=True)
class ToolContext:
    """What a tool call may use beyond its arguments: who calls, and the limits that apply."""

    workspace_id: uuid.UUID
    network: NetGuard = field(default_factory=NetGuard)
    """Which URLs tools may fetch; carries the workspace's `allow_private_network`."""
    fetch_limits: FetchLimits = field(default_factory=FetchLimits)
    timeout_seconds: float = 60.0
    """The longest one tool call may take."""
    knowledge: KnowledgeSearch | None = None
    """The agent's knowledge bases, for `search_knowledge`; None when it lists none."""
    clock: Callable[[], datetime] = utcnow

    @classmethod
    def for_workspace(
        cls, workspace_id: uuid.UUID, *, allow_private_network: bool = False
    ) -> ToolContext:
        return cls(
            workspace_id=workspace_id,
            network=NetGuard(allow_private_network=allow_private_network),
        )

    @property
    def allow_private_network(self) -> bool:
        return self.network.allow_private_network


class _ToolSchema(GenerateJsonSchema):
    """JSON Schema for the model: no generated titles, which only cost tokens."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


@dataclass(frozen=True, kw_only=True)
class Tool(Generic[ArgsT]):
    name: str
    description: str
    """What the model reads to decide when and how to call the tool."""
    arguments: type[ArgsT]
    function: Callable[[ToolContext, ArgsT], Awaitable[ToolOutput]]

    def __post_init__(self) -> None:
        if not _TOOL_NAME.fullmatch(self.name):
            raise ValueError(
                f"invalid tool name {self.name!r}: a letter, then up to 63 letters, digits, _ or -"
            )
        if self.arguments.model_config.get("extra") != "forbid":
            raise ValueError(f"{self.name}: the arguments model must forbid extra fields")

    @cached_property
    def parameters_schema(self) -> dict[str, Any]:
        """The JSON Schema (draft 2020-12) of the arguments object."""
        schema = self.arguments.model_json_schema(schema_generator=_ToolSchema)
        schema.pop("title", None)
        schema.pop("description", None)  # the tool's description says it; no docstring leaks
        return schema

    def validate(self, arguments: Mapping[str, Any] | str | bytes | None) -> ArgsT:
        """Validate arguments given as a mapping or as JSON text; errors name the bad fields."""
        try:
            if isinstance(arguments, str | bytes):
                return self.arguments.model_validate_json(arguments or "{}")
            return self.arguments.model_validate(dict(arguments or {}))
        except ValidationError as exc:
            raise ToolInputError(f"invalid arguments for {self.name}: {_describe(exc)}") from exc

    async def call(
        self, ctx: ToolContext, arguments: Mapping[str, Any] | str | bytes | None
    ) -> ToolOutput:
        """Validate and run, within `ctx.timeout_seconds`."""
        args = self.validate(arguments)
        deadline = asyncio.timeout(ctx.timeout_seconds)
        try:
            async with deadline:
                return await self.function(ctx, args)
        except TimeoutError:
            if deadline.expired():
                raise ToolFailure(
                    f"{self.name} did not finish within {ctx.timeout_seconds:g} seconds"
                ) from None
            raise


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "arguments"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


class ToolDescription(BaseModel):
    """A tool as listed by the API."""

    name: str
    description: str
    parameters: dict[str, Any] = Field(description="JSON Schema of the arguments object.")


class ToolRegistry:
    """Tools by name. Registering a name twice is an error, so plugins cannot shadow each other."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool[Any]] = {}

    def register(self, tool: Tool[ArgsT]) -> Tool[ArgsT]:
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def get(self, name: str) -> Tool[Any]:
        try:
            return self._tools[name]
        except KeyError:
            raise ToolNotFound(f"No tool named {name!r}; {self._known()}") from None

    def names(self) -> list[str]:
        return sorted(self._tools)

    def describe(self) -> list[ToolDescription]:
        return [
            ToolDescription(name=t.name, description=t.description, parameters=t.parameters_schema)
            for t in (self._tools[n] for n in self.names())
        ]

    def validate_names(self, names: Iterable[str]) -> list[str]:
        """The names, deduplicated in order, if every one is a registered tool."""
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in self._tools]
        if unknown:
            listed = ", ".join(repr(n) for n in unknown)
            noun = "tool" if len(unknown) == 1 else "tools"
            raise UnknownTool(f"Unknown {noun} {listed}; {self._known()}")
        return wanted

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool[Any]]:
        return iter(self._tools[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._tools)

    def _known(self) -> str:
        return "known tools: " + (", ".join(self.names()) or "none")


def load_plugins(registry: ToolRegistry, plugins: Iterable[str | ModuleType]) -> None:
    """Let each plugin module register its tools through its `register_tools(registry)`."""
    for plugin in plugins:
        module = importlib.import_module(plugin) if isinstance(plugin, str) else plugin
        hook = getattr(module, "register_tools", None)
        if not callable(hook):
            raise TypeError(f"tool plugin {module.__name__} has no register_tools(registry)")
        hook(registry)


@cache
def default_registry() -> ToolRegistry:
    """The process-wide registry: the built-in tools."""
    registry = ToolRegistry()
    load_plugins(registry, BUILTIN_PLUGINS)
    return registry
