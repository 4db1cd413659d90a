"""HTTP clients shared by the model runtimes of a process."""

from __future__ import annotations

from pydantic_ai import Agent

from fakes.openai_server import FakeOpenAI, Reply
from heron.providers.connection import ProviderConnection
from heron.providers.models import ProviderKind
from heron.providers.runtime import HttpClients, ModelRuntime

KEY = "sk-test-shared-0123456789"


def connection(name: str, url: str) -> ProviderConnection:
    return ProviderConnection(name, ProviderKind.openai_compatible, url, KEY)


async def test_runtimes_sharing_clients_outlive_each_other_and_keep_no_cookies() -> None:
    fake = FakeOpenAI(api_key=KEY, models=["small"])
    fake.push(
        Reply(text="one", headers={"Set-Cookie": "tracker=abc; Path=/"}),
        Reply(text="two"),
        Reply(text="three"),
    )
    shared = HttpClients()
    async with fake.serve() as url:
        try:
            # Two workspaces' connections to the same server, with equal client settings.
            async with ModelRuntime([connection("a", url)], clients=shared) as first:
                result = await Agent(first.model("a:small")).run("Hi")
                assert result.output == "one"
            async with ModelRuntime([connection("b", url)], clients=shared) as second:
                assert (await Agent(second.model("b:small")).run("Hi")).output == "two"
        finally:
            await shared.aclose()
        # A runtime without shared clients has its own, closed with it.
        async with ModelRuntime([connection("c", url)]) as alone:
            assert (await Agent(alone.model("c:small")).run("Hi")).output == "three"
    assert [r.headers.get("cookie") for r in fake.chat_requests] == [None, None, None]
