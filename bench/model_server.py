"""A zero-latency scripted model for the benchmarks, speaking the OpenAI wire format.

It is the tests' fake OpenAI server (tests/fakes/openai_server.py, imported by path, so the
benchmarks and the tests exercise the same wire format), run on its own under uvicorn (uvloop and
httptools, as `heron serve` runs), with a stateless script so any number of clients can use it at
once:

- a user message containing `tool rounds: N` is answered with a call of `calculator` while the
  conversation after it holds fewer than N tool results, then with the text `TOOL_ANSWER`;
- any other user message is answered with the text `ANSWER`, streamed in `CHUNK_SIZE`-character
  pieces when the request streams.

Nothing waits: no first-byte delay, no delay between chunks. Requests are not recorded (the fake
keeps them for the tests' assertions; a benchmark would only accumulate them).

    python bench/model_server.py PORT    # serves http://127.0.0.1:PORT/v1 until SIGTERM
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # `fakes.openai_server` imports the tests' `conftest`

from fakes.openai_server import FakeOpenAI, RecordedRequest, Reply, ToolCall  # noqa: E402

API_KEY = "sk-bench-0123456789abcdef"
MODEL = "gpt-bench"
ANSWER = "Hello! This is a short streamed answer from the benchmark model."
TOOL_ANSWER = "All the sums are done: the last one is 70."
CHUNK_SIZE = 4
_ROUNDS = re.compile(r"tool rounds: (\d+)")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def script(request: RecordedRequest) -> Reply:
    messages: list[dict[str, Any]] = request.body.get("messages") or []
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        return Reply(text=ANSWER, chunk_size=CHUNK_SIZE)
    last = users[-1]
    wanted = _ROUNDS.search(_text(messages[last].get("content")))
    if wanted is None:
        return Reply(text=ANSWER, chunk_size=CHUNK_SIZE)
    done = sum(1 for m in messages[last + 1 :] if m.get("role") == "tool")
    if done < int(wanted.group(1)):
        call = ToolCall("calculator", {"expression": f"{done + 1} * 7"})
        return Reply(tool_calls=[call], chunk_size=64)
    return Reply(text=TOOL_ANSWER, chunk_size=CHUNK_SIZE)


class _Unrecorded(list[RecordedRequest]):
    def append(self, item: RecordedRequest) -> None:
        pass


def make_fake() -> FakeOpenAI:
    fake = FakeOpenAI(api_key=API_KEY, models=[MODEL])
    fake.handler = script
    fake.requests = _Unrecorded()
    return fake


def main() -> None:
    import uvicorn

    port = int(sys.argv[1])
    uvicorn.run(
        make_fake().app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
