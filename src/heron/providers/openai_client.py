"""An OpenAI SDK client whose chat completions send the conversation as it is given.

`AsyncCompletions.create` passes every request body through the SDK's `async_maybe_transform`
before sending it: a walk of the whole body against the `CompletionCreateParams` type graph
(each message against every member of the message union, with type introspection at every
level), awaited node by node, with the GIL held. For chat completions it changes nothing: no
parameter type of the chat API carries a key alias or a format (`PropertyInfo`), and pydantic-ai
hands over plain JSON (its `_map_messages` builds dicts). It costs about 0.3 ms per message on
this project's reference machine, paid again on every request: a ten-round tool conversation
spent a quarter of its CPU time there, and a long history many milliseconds before the first
byte leaves.

The client here moves a request's `messages` and `tools` into `extra_body`, which the SDK merges
into the JSON body after the transform. An empty list stays in their place: it satisfies the
SDK's required arguments and keeps each key's position, so the bytes sent are the same as
before (tests/test_providers.py compares them). Only plain JSON is moved (dicts with string keys,
lists, strings, numbers, booleans, null): anything else, a pydantic model or a file, keeps the
typed path. A caller's own `extra_body` entry for either field wins.

Only heron.providers.runtime imports this module, when it builds an OpenAI-style model: the SDK
is large.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

from openai import AsyncOpenAI
from openai.resources.chat import AsyncChat
from openai.resources.chat.completions import AsyncCompletions

# The bulk of a chat completion request, moved out of the SDK's transform.
_MOVED = ("messages", "tools")
_SCALARS = (str, int, float, bool, type(None))


def is_plain_json(value: object) -> bool:
    """Whether `value` is made only of dicts with string keys, lists and JSON scalars: what
    the SDK's transform passes through unchanged and its JSON encoder writes as it is."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            for key, inner in item.items():  # type: ignore[attr-defined]
                if type(key) is not str:
                    return False
                stack.append(inner)
        elif kind is list:
            stack.extend(item)  # type: ignore[arg-type]
        elif kind not in _SCALARS:
            return False
    return True


def untransformed(params: dict[str, Any]) -> dict[str, Any]:
    """`create`'s keyword arguments with the plain-JSON bulk fields moved into `extra_body`."""
    extra = params.get("extra_body")
    if extra is not None and not isinstance(extra, Mapping):
        return params
    moved: dict[str, Any] = {}
    for name in _MOVED:
        value = params.get(name)
        wanted = isinstance(value, list) and value and (extra is None or name not in extra)
        if wanted and is_plain_json(value):
            moved[name] = value
    if not moved:
        return params
    return params | {name: [] for name in moved} | {"extra_body": {**moved, **(extra or {})}}


class _Completions(AsyncCompletions):
    async def create(self, **params: Any) -> Any:
        return await super().create(**untransformed(params))


class _Chat(AsyncChat):
    @cached_property
    def completions(self) -> AsyncCompletions:
        return _Completions(self._client)


class PassthroughOpenAI(AsyncOpenAI):
    """`AsyncOpenAI` whose `chat.completions.create` skips the SDK's transform for the
    request's messages and tools (copies made by `with_options` are of this class too)."""

    @cached_property
    def chat(self) -> AsyncChat:
        return _Chat(self)
