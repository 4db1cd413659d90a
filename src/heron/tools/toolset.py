"""Registry tools as a pydantic-ai toolset, bound to the context of one run.

Arguments are validated by the registry, not by pydantic-ai (`Tool.from_schema` passes them
through), so an agent run and any other caller of a tool see the same validation. The errors a
tool raises for the model become pydantic-ai's: `ToolInputError` a `ModelRetry` (the model is
asked to correct its call, within the tool's retry budget), `ToolFailure` a `ToolFailed` (the
model sees the failure and adapts; no retry is consumed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic_ai import FunctionToolset, ModelRetry, ToolFailed
from pydantic_ai import Tool as AgentTool

from heron.tools.registry import Tool, ToolContext, ToolFailure, ToolInputError, ToolOutput


def agent_tool(tool: Tool[Any], ctx: ToolContext) -> AgentTool:
    """One registry tool as a pydantic-ai tool whose calls run with `ctx`."""

    async def call(**arguments: Any) -> ToolOutput:
        try:
            return await tool.call(ctx, arguments)
        except ToolInputError as exc:
            raise ModelRetry(exc.message) from exc
        except ToolFailure as exc:
            raise ToolFailed(exc.message) from exc

    return AgentTool.from_schema(
        call, name=tool.name, description=tool.description, json_schema=tool.parameters_schema
    )


def build_toolset(
    tools: Iterable[Tool[Any]], ctx: ToolContext, *, max_retries: int | None = None
) -> FunctionToolset[Any]:
    """A toolset of `tools` for an agent run; `max_retries` None keeps the agent's default."""
    return FunctionToolset([agent_tool(t, ctx) for t in tools], max_retries=max_retries)
