"""`search_knowledge`: find passages in the agent's knowledge bases, with citations.

An agent that lists knowledge bases (`AgentSpec.knowledge_bases`) gets this tool. Each result
carries its citation as data (knowledge base, document, chunk, page, headings), so the answer
can name its sources and the run's events and messages keep them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from heron.tools.registry import (
    Tool,
    ToolArguments,
    ToolContext,
    ToolFailure,
    ToolOutput,
    ToolRegistry,
)


class SearchKnowledgeArgs(ToolArguments):
    query: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2000,
            description="What to look for, in words likely to appear in the passages.",
        ),
    ]
    top_k: Annotated[int, Field(ge=1, le=20, description="How many passages to return.")] = 5
    knowledge_base: Annotated[
        str | None,
        Field(
            max_length=100,
            description="Search only this knowledge base (its name); all of them by default.",
        ),
    ] = None


async def search_knowledge(ctx: ToolContext, args: SearchKnowledgeArgs) -> ToolOutput:
    if ctx.knowledge is None:
        raise ToolFailure("this agent has no knowledge bases to search")
    results = await ctx.knowledge.search(
        args.query, top_k=args.top_k, knowledge_base=args.knowledge_base
    )
    if not results:
        return {"results": [], "note": "Nothing in the knowledge bases matches this query."}
    return {"results": list(results)}


search_knowledge_tool = Tool(
    name="search_knowledge",
    description=(
        "Search the knowledge bases available to you for passages relevant to a query "
        "(keyword and semantic search combined). Each result has the passage text and a "
        "citation (document title, page, chunk id). Base your answer on these passages and "
        "cite the documents you used by title (and page when given)."
    ),
    arguments=SearchKnowledgeArgs,
    function=search_knowledge,
)


def register_tools(registry: ToolRegistry) -> None:
    registry.register(search_knowledge_tool)
