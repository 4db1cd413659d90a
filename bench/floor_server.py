"""The floor under Heron's streaming time to first token: the same stack with none of Heron.

A FastAPI app under uvicorn (uvloop and httptools, as `heron serve` runs) with one endpoint
shaped like Heron's `POST /api/threads/{id}/runs` with `stream: true`: it drives one prebuilt
pydantic-ai agent (the OpenAI-compatible model over Heron's own OpenAI client, as Heron's models
use it) with `agent.iter` + `node.stream`, as Heron's executor does, and sends each text delta as
an SSE `message.delta` event in Heron's format, then `run.completed`. No authentication, no
database, no run, no event log, no thread history: what remains is the HTTP server, the body's
validation, pydantic-ai's loop and the SSE response, which any platform built on these libraries
pays. Heron's time to first token minus this one's is what Heron's own machinery costs.

    python bench/floor_server.py PORT MODEL_URL    # until SIGTERM
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


class RunBody(BaseModel):
    agent: str
    input: str
    stream: bool = False


def make_app(model_url: str) -> FastAPI:
    from model_server import API_KEY, MODEL
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from runs import INSTRUCTIONS, text_of

    from heron.providers.openai_client import PassthroughOpenAI

    client = PassthroughOpenAI(base_url=model_url, api_key=API_KEY, max_retries=0)
    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(openai_client=client))
    agent: Agent[None, str] = Agent(model, instructions=INSTRUCTIONS)
    app = FastAPI()

    def sse(seq: int, type: str, data: dict[str, Any]) -> bytes:
        body = json.dumps(data, separators=(",", ":"))
        return f"id: {seq}\nevent: {type}\ndata: {body}\n\n".encode()

    @app.post("/api/threads/{thread_id}/runs")
    async def run(thread_id: str, body: RunBody) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            seq = 0
            async with agent.iter(body.input) as agent_run:
                async for node in agent_run:
                    if Agent.is_model_request_node(node) or Agent.is_call_tools_node(node):
                        async with node.stream(agent_run.ctx) as stream:
                            async for event in stream:
                                text = text_of(event)
                                if text:
                                    seq += 1
                                    yield sse(seq, "message.delta", {"text": text})
            assert agent_run.result is not None
            seq += 1
            yield sse(seq, "run.completed", {"output": agent_run.result.output})

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    port, model_url = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        make_app(model_url),
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
