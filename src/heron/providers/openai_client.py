"""An OpenAI SDK client whose chat completions send the conversation past the SDK's request
transform (heron.providers.sdkbody says why and how; the bytes sent are the same)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from openai import AsyncOpenAI
from openai.resources.chat import AsyncChat
from openai.resources.chat.completions import AsyncCompletions

from heron.providers.sdkbody import untransformed


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
