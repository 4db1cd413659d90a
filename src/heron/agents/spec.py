"""What an agent is: the spec stored as its draft and frozen into each published version.

The spec is validated on its own here (shape, template syntax, declared variables, JSON Schema
of structured output, approval policies naming listed tools). What needs the workspace —
providers and tool names — is checked by the service.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from heron.core.errors import ValidationFailed

ModelRef = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*:.+$", max_length=300),
    Field(description="`provider-name:model-name`, e.g. `openai:gpt-4o-mini`."),
]
VariableName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
ApprovalPolicy = Literal["never", "always"]

KNOWLEDGE_TOOL = "search_knowledge"

_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class Variable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    default: str | None = Field(None, description="Used when a run gives no value.")


class ModelSettingsSpec(BaseModel):
    """Sampling settings passed to the model (those a provider doesn't support are ignored)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: int | None = None
    stop_sequences: Annotated[list[str], Field(max_length=8)] | None = None
    timeout: Annotated[float, Field(gt=0, le=3600)] | None = Field(
        None, description="Seconds one model request may take."
    )


class AgentSpec(BaseModel):
    """Everything about an agent but its name and identity."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    description: Annotated[str, StringConstraints(max_length=2000)] = ""
    variables: dict[VariableName, Variable] = Field(
        default_factory=dict, description="Variables the instructions may use."
    )
    instructions: Annotated[str, StringConstraints(max_length=100_000)] = Field(
        "", description="System prompt; `{{name}}` is filled from the run's variables."
    )
    model: ModelRef
    fallbacks: Annotated[list[ModelRef], Field(max_length=8)] = Field(
        default_factory=list, description="Tried in order when the model's provider fails."
    )
    model_settings: ModelSettingsSpec = Field(default_factory=ModelSettingsSpec)
    tools: Annotated[list[str], Field(max_length=64)] = Field(
        default_factory=list, description="Names of tools the agent may call."
    )
    approval: dict[str, ApprovalPolicy] = Field(
        default_factory=dict,
        description="Per tool: `always` pauses the run for a human to approve each call.",
    )
    output_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema the final answer must match (structured output)."
    )
    knowledge_bases: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=100)]], Field(max_length=16)
    ] = Field(
        default_factory=list,
        description="Knowledge bases (names or ids) the agent searches with its "
        "`search_knowledge` tool, which is added to `tools` when any are listed.",
    )
    max_steps: Annotated[int, Field(ge=1, le=500)] = Field(
        20, description="Most rounds of tool calls in one run."
    )
    tags: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=64)]], Field(max_length=32)
    ] = Field(default_factory=list)
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[str]) -> list[str]:
        duplicates = sorted({t for t in tools if tools.count(t) > 1})
        if duplicates:
            raise ValueError(f"listed more than once: {', '.join(duplicates)}")
        return tools

    @field_validator("knowledge_bases")
    @classmethod
    def _unique_knowledge_bases(cls, refs: list[str]) -> list[str]:
        return list(dict.fromkeys(refs))

    @model_validator(mode="after")
    def _knowledge_tool(self) -> AgentSpec:
        if self.knowledge_bases and KNOWLEDGE_TOOL not in self.tools:
            self.tools = [*self.tools, KNOWLEDGE_TOOL]
        return self

    @field_validator("output_schema")
    @classmethod
    def _valid_json_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "(root)"
            raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from None
        if schema.get("type", "object") != "object":
            raise ValueError('the output schema must describe an object ("type": "object")')
        return schema

    @field_validator("instructions")
    @classmethod
    def _declared_variables(cls, instructions: str, info: ValidationInfo) -> str:
        check_template_syntax(instructions)
        declared = info.data.get("variables", {})
        undefined = sorted(template_variables(instructions) - set(declared))
        if undefined:
            raise ValueError(
                f"uses undefined variables: {', '.join(undefined)} (declare them under `variables`)"
            )
        return instructions

    @field_validator("approval")
    @classmethod
    def _approval_for_listed_tools(
        cls, approval: dict[str, ApprovalPolicy], info: ValidationInfo
    ) -> dict[str, ApprovalPolicy]:
        unknown = sorted(set(approval) - set(info.data.get("tools", [])))
        if unknown:
            raise ValueError(f"names tools the agent doesn't list: {', '.join(unknown)}")
        return approval


def template_variables(template: str) -> set[str]:
    return set(_VARIABLE.findall(template))


def check_template_syntax(template: str) -> None:
    leftover = _VARIABLE.sub("", template)
    if "{{" in leftover or "}}" in leftover:
        raise ValueError("contains a malformed placeholder; write variables as {{name}}")


def render_instructions(spec: AgentSpec, values: dict[str, str]) -> str:
    """Fill the instructions; a variable with neither a value nor a default is a 422."""
    missing = sorted(
        name
        for name in template_variables(spec.instructions)
        if name not in values and spec.variables[name].default is None
    )
    if missing:
        raise ValidationFailed(
            f"missing variables: {', '.join(missing)}", missing_variables=missing
        )

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        value = values.get(name)
        return value if value is not None else str(spec.variables[name].default)

    return _VARIABLE.sub(fill, spec.instructions)


def diff_specs(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Field-by-field changes from `a` to `b`; nested settings are compared per key."""
    changes: list[dict[str, Any]] = []
    for field in AgentSpec.model_fields:
        before, after = a.get(field), b.get(field)
        if before == after:
            continue
        if field == "model_settings" and isinstance(before, dict) and isinstance(after, dict):
            for key in sorted(set(before) | set(after)):
                if before.get(key) != after.get(key):
                    changes.append(
                        {"field": f"{field}.{key}", "from": before.get(key), "to": after.get(key)}
                    )
            continue
        changes.append({"field": field, "from": before, "to": after})
    return changes
