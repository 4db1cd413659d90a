"""Checks of what an agent spec names in its workspace: providers, models, tools and knowledge
bases."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from heron.agents.spec import AgentSpec
from heron.core.errors import FieldError, ValidationFailed
from heron.providers.models import Provider
from heron.providers.repository import ProviderRepository
from heron.tools.registry import default_registry


async def check_references(
    session: AsyncSession, workspace_id: uuid.UUID, spec: AgentSpec
) -> list[Provider]:
    """422 naming each model reference whose provider doesn't exist in the workspace (or whose
    model the provider doesn't offer, when it has listed its models) and each unknown tool.
    Returns the provider connections the spec names."""
    errors: list[FieldError] = []
    refs: list[tuple[list[str | int], str]] = [(["model"], spec.model)]
    refs += [(["fallbacks", i], ref) for i, ref in enumerate(spec.fallbacks)]
    names = {ref.split(":", 1)[0] for _, ref in refs}
    providers = {p.name: p for p in await ProviderRepository(session, workspace_id).by_names(names)}
    for loc, ref in refs:
        provider_name, model_name = ref.split(":", 1)
        provider: Provider | None = providers.get(provider_name)
        if provider is None:
            errors.append(
                FieldError(
                    loc=["body", *loc],
                    msg=f"no provider named {provider_name!r} in this workspace",
                    type="unknown_provider",
                )
            )
        elif provider.models and model_name not in provider.models:
            errors.append(
                FieldError(
                    loc=["body", *loc],
                    msg=f"provider {provider_name!r} does not offer model {model_name!r}",
                    type="unknown_model",
                )
            )
    known = default_registry().names()
    for i, tool in enumerate(spec.tools):
        if tool not in known:
            errors.append(
                FieldError(
                    loc=["body", "tools", i],
                    msg=f"unknown tool {tool!r}; available: {', '.join(sorted(known))}",
                    type="unknown_tool",
                )
            )
    if spec.knowledge_bases:
        from heron.knowledge.repository import KnowledgeBaseRepository

        kbs = KnowledgeBaseRepository(session, workspace_id)
        for i, ref in enumerate(spec.knowledge_bases):
            if await kbs.find(ref) is None:
                errors.append(
                    FieldError(
                        loc=["body", "knowledge_bases", i],
                        msg=f"no knowledge base with id or name {ref!r} in this workspace",
                        type="unknown_knowledge_base",
                    )
                )
    if errors:
        first = errors[0]
        raise ValidationFailed(f"{'.'.join(str(p) for p in first.loc)}: {first.msg}", errors=errors)
    return list(providers.values())
