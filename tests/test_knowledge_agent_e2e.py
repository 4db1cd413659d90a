"""An agent run that searches a knowledge base and keeps the citations (needs the executor to
give tools `ToolContext.knowledge`)."""

from __future__ import annotations

import json

import httpx

from conftest import Tenant
from fakes.openai_server import FakeOpenAI, Reply, ToolCall
from test_knowledge import HERONS, add, create_kb, wait_idle
from test_runs import make_agent, new_thread, wait_status


async def test_an_agent_cites_the_knowledge_it_searched(
    client: httpx.AsyncClient, alice: Tenant
) -> None:
    kb = await create_kb(client, alice, "birds")
    herons = await add(client, alice, kb["id"], text=HERONS, title="Herons")
    await wait_idle(client, alice, kb["id"])
    fake = FakeOpenAI(api_key="sk-test-runs-0123456789", models=["small"])
    async with fake.serve() as url:
        await make_agent(client, alice, url, knowledge_bases=["birds"])
        thread = await new_thread(client, alice)
        fake.push(
            Reply(tool_calls=[ToolCall("search_knowledge", {"query": "where do herons nest"})]),
            Reply(text="In heronries, high in trees [Herons]."),
        )
        run = (
            await client.post(
                f"/api/threads/{thread}/runs",
                json={"agent": "helper", "input": "Where do herons nest?"},
                headers=alice.headers,
            )
        ).json()
        done = await wait_status(client, alice, run["id"], "completed", "failed")
    assert done["status"] == "completed", done
    events = (await client.get(f"/api/runs/{run['id']}/events", headers=alice.headers)).text
    completed = [
        json.loads(line[6:])
        for line in events.splitlines()
        if line.startswith("data: ") and '"search_knowledge"' in line and "result" in line
    ]
    citation = completed[0]["data"]["results"][0]["citation"]
    assert citation["document_id"] == herons["id"]
    assert citation["heading_path"] == ["Herons", "Nesting"]
    messages = (await client.get(f"/api/threads/{thread}/messages", headers=alice.headers)).json()[
        "items"
    ]
    tool_result = next(p for m in messages for p in m["parts"] if p["type"] == "tool_result")
    assert (
        json.loads(tool_result["content"])["results"][0]["citation"]["document_id"] == herons["id"]
    )
    # The model was given the passage to answer from.
    assert "heronries" in json.dumps(fake.chat_requests[-1].body)
