"""Between pydantic-ai's messages (replayed to models) and the API's message parts."""

from __future__ import annotations

from typing import Any

from pydantic_ai import (
    DeferredToolResults,
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    RetryPromptPart,
    TextPart,
    ToolCallPart,
    ToolFailed,
    ToolReturnPart,
    UserPromptPart,
)


def dump(message: ModelMessage) -> dict[str, Any]:
    data: dict[str, Any] = ModelMessagesTypeAdapter.dump_python([message], mode="json")[0]
    return data


def load(raw: list[dict[str, Any]]) -> list[ModelMessage]:
    return list(ModelMessagesTypeAdapter.validate_python(raw))


def api_view(message: ModelMessage) -> tuple[str, list[dict[str, Any]]]:
    """The role and structured parts the API shows for one message."""
    parts: list[dict[str, Any]] = []
    if isinstance(message, ModelResponse):
        for part in message.parts:
            if isinstance(part, TextPart) and part.content:
                parts.append({"type": "text", "text": part.content})
            elif isinstance(part, ToolCallPart):
                parts.append(
                    {
                        "type": "tool_call",
                        "id": part.tool_call_id,
                        "name": part.tool_name,
                        "arguments": part.args_as_dict(),
                    }
                )
        return "assistant", parts
    role = "user"
    for rp in message.parts:
        if isinstance(rp, UserPromptPart):
            text = rp.content if isinstance(rp.content, str) else str(rp.content)
            parts.append({"type": "text", "text": text})
        elif isinstance(rp, ToolReturnPart):
            role = "tool"
            parts.append(
                {
                    "type": "tool_result",
                    "id": rp.tool_call_id,
                    "name": rp.tool_name,
                    "content": rp.model_response_str(),
                    "is_error": rp.outcome not in ("success", None),
                }
            )
        elif isinstance(rp, RetryPromptPart):
            role = "tool"
            parts.append(
                {
                    "type": "tool_result",
                    "id": rp.tool_call_id,
                    "name": rp.tool_name,
                    "content": rp.model_response(),
                    "is_error": True,
                }
            )
    return role, parts


def prepare_resume(
    history: list[ModelMessage],
) -> tuple[list[ModelMessage], DeferredToolResults | None]:
    """Make a history that was cut off mid-step resumable: a partial model answer is dropped
    (the model is asked again); of a partial batch of tool results, the finished ones are kept
    and only the missing calls run (a completed tool call never runs twice)."""
    history = list(history)
    while history and isinstance(history[-1], ModelResponse) and history[-1].state == "interrupted":
        history.pop()
    last = history[-1] if history else None
    if isinstance(last, ModelRequest) and last.state == "interrupted":
        history.pop()
        done = {p.tool_call_id: p for p in last.parts if isinstance(p, ToolReturnPart)}
        if done and history and isinstance(history[-1], ModelResponse):
            pending = [c.tool_call_id for c in history[-1].tool_calls if c.tool_call_id not in done]
            return history, DeferredToolResults(
                calls={
                    i: (p.content if p.outcome == "success" else ToolFailed(str(p.content)))
                    for i, p in done.items()
                },
                approvals=dict.fromkeys(pending, True),
            )
    return history, None


def ends_with_pending_work(history: list[ModelMessage]) -> bool:
    """True when the history needs the model or tools (not a finished answer)."""
    if not history:
        return False
    last = history[-1]
    return isinstance(last, ModelRequest) or bool(last.tool_calls)
