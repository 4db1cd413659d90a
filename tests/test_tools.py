"""The tool registry, the built-in tools, and running them inside a pydantic-ai agent."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import types
import uuid
from collections.abc import Sequence
from dataclasses import replace

import httpx
import jsonschema
import pytest
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from conftest import serve
from heron.core.netguard import FetchLimits, IPAddress, NetGuard, non_public_reason
from heron.tools.builtin.calculator import evaluate
from heron.tools.registry import (
    Tool,
    ToolArguments,
    ToolContext,
    ToolFailure,
    ToolInputError,
    ToolNotFound,
    ToolRegistry,
    UnknownTool,
    default_registry,
    load_plugins,
)
from heron.tools.toolset import build_toolset

WORKSPACE = uuid.UUID("01890000-0000-7000-8000-000000000001")


def context(**kwargs) -> ToolContext:  # type: ignore[no-untyped-def]
    return ToolContext(workspace_id=WORKSPACE, **kwargs)


async def call(name: str, arguments: dict[str, object], ctx: ToolContext | None = None) -> object:
    return await default_registry().get(name).call(ctx or context(), arguments)


# The registry ------------------------------------------------------------------------------------


def test_the_built_in_tools_are_registered_with_valid_json_schemas() -> None:
    registry = default_registry()
    assert registry.names() == ["calculator", "current_time", "http_fetch", "search_knowledge"]
    listed = registry.describe()
    assert [d.name for d in listed] == registry.names()
    for described in listed:
        assert len(described.description) > 40
        schema = described.parameters
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object"
        assert schema["additionalProperties"] is False
        assert "title" not in schema
        assert all("title" not in p for p in schema["properties"].values())
    fetch = registry.get("http_fetch").parameters_schema
    assert fetch["required"] == ["url"]
    validator = jsonschema.Draft202012Validator(fetch)
    assert validator.is_valid({"url": "https://example.com", "max_length": 500})
    assert not validator.is_valid({"url": "https://example.com", "max_length": 1})
    assert not validator.is_valid({"href": "https://example.com"})


def test_unknown_tool_names_are_clear_errors_listing_the_known_ones() -> None:
    registry = default_registry()
    with pytest.raises(ToolNotFound) as not_found:
        registry.get("web_search")
    assert not_found.value.status == 404
    assert (
        "known tools: calculator, current_time, http_fetch, search_knowledge"
        in not_found.value.detail
    )

    assert registry.validate_names(["http_fetch", "calculator", "http_fetch"]) == [
        "http_fetch",
        "calculator",
    ]
    with pytest.raises(UnknownTool) as unknown:
        registry.validate_names(["calculator", "shell", "python"])
    assert unknown.value.status == 422
    assert unknown.value.detail == (
        "Unknown tools 'shell', 'python'; "
        "known tools: calculator, current_time, http_fetch, search_knowledge"
    )


class EchoArgs(ToolArguments):
    text: str


async def echo(ctx: ToolContext, args: EchoArgs) -> str:
    return args.text


def test_plugins_register_tools_and_mistakes_are_caught_at_registration() -> None:
    plugin = types.ModuleType("echo_plugin")
    plugin.register_tools = lambda registry: registry.register(  # type: ignore[attr-defined]
        Tool(name="echo", description="Echo", arguments=EchoArgs, function=echo)
    )
    registry = ToolRegistry()
    load_plugins(registry, [plugin, "heron.tools.builtin.calculator"])
    assert registry.names() == ["calculator", "echo"]
    assert "echo" in registry
    assert len(registry) == 2

    with pytest.raises(ValueError, match="already registered"):
        load_plugins(registry, [plugin])
    with pytest.raises(TypeError, match="has no register_tools"):
        load_plugins(registry, [types.ModuleType("empty")])
    with pytest.raises(ValueError, match="invalid tool name"):
        Tool(name="echo tool", description="x", arguments=EchoArgs, function=echo)

    class Loose(BaseModel):
        text: str

    with pytest.raises(ValueError, match="must forbid extra fields"):
        Tool(name="loose", description="x", arguments=Loose, function=echo)  # type: ignore[arg-type]


async def test_arguments_are_validated_with_errors_naming_the_fields() -> None:
    calculator = default_registry().get("calculator")
    assert await calculator.call(context(), '{"expression": "6 * 7"}') == "42"
    for arguments, message in [
        ({}, "invalid arguments for calculator: expression: Field required"),
        ({"expression": "1", "mode": "x"}, "mode: Extra inputs are not permitted"),
        ({"expression": 12}, "expression: Input should be a valid string"),
        ("{not json", "invalid arguments for calculator: "),
    ]:
        with pytest.raises(ToolInputError) as invalid:
            await calculator.call(context(), arguments)  # type: ignore[arg-type]
        assert message in invalid.value.message


async def test_a_tool_that_outlives_its_timeout_fails_with_a_clear_message() -> None:
    released = asyncio.Event()

    async def stuck(ctx: ToolContext, args: EchoArgs) -> str:
        await released.wait()
        return args.text

    tool = Tool(name="stuck", description="Never ends", arguments=EchoArgs, function=stuck)
    with pytest.raises(ToolFailure, match=r"stuck did not finish within 0\.05 seconds"):
        await tool.call(context(timeout_seconds=0.05), {"text": "x"})


# The pydantic-ai bridge --------------------------------------------------------------------------


def returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [
        part
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    ]


async def test_an_agent_calls_the_calculator_and_reads_the_result() -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        assert [t.name for t in info.function_tools] == ["calculator", "current_time"]
        calculator = next(t for t in info.function_tools if t.name == "calculator")
        assert calculator.parameters_json_schema["required"] == ["expression"]
        done = returns(messages)
        if not done:
            return ModelResponse(parts=[ToolCallPart("calculator", {"expression": "6 * 7"})])
        return ModelResponse(parts=[TextPart(f"The answer is {done[-1].content}.")])

    registry = default_registry()
    toolset = build_toolset([registry.get("calculator"), registry.get("current_time")], context())
    result = await Agent(FunctionModel(model), toolsets=[toolset]).run("What is 6 times 7?")
    assert result.output == "The answer is 42."
    (answer,) = returns(result.all_messages())
    assert (answer.tool_name, answer.content, answer.outcome) == ("calculator", "42", "success")


async def test_bad_arguments_go_back_to_the_model_to_retry_and_failures_to_adapt() -> None:
    calls = [
        {"expr": "1 + 1"},  # wrong argument name: retried
        {"expression": "1 / 0"},  # a failure the model sees; no retry consumed
        {"expression": "2 ** 10"},
    ]

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        done = returns(messages)
        if len(done) < len(calls):
            return ModelResponse(parts=[ToolCallPart("calculator", calls[len(done)])])
        return ModelResponse(parts=[TextPart("done")])

    toolset = build_toolset([default_registry().get("calculator")], context(), max_retries=1)
    result = await Agent(FunctionModel(model), toolsets=[toolset]).run("compute")
    retried, failed, ok = returns(result.all_messages())
    assert retried.outcome == "retried"
    assert "expression: Field required" in str(retried.content)
    assert "expr: Extra inputs are not permitted" in str(retried.content)
    assert (failed.outcome, failed.content) == ("failed", "division by zero")
    assert (ok.outcome, ok.content) == ("success", "1024")


# calculator --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("7 / 2", "3.5"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("2 ** 10", "1024"),
        ("2 ** -1", "0.5"),
        ("-3 ** 2", "-9"),
        ("+-+4", "-4"),
        ("1_000 * 1.5e3", "1500000"),
        ("0.1 + 0.2", "0.30000000000000004"),
        ("sqrt(16) + abs(-2)", "6"),
        ("round(2 * pi, 3)", "6.283"),
        ("round(2.5)", "2"),
        ("log(8, 2)", "3"),
        ("log(e)", "1"),
        ("exp(0) + cos(0) + sin(0) + tan(0)", "2"),
        ("floor(-2.5) + ceil(2.1)", "0"),
        ("2 ** 64", "18446744073709551616"),
        ("1" + "+1" * 150, "151"),
    ],
)
async def test_the_calculator_computes(expression: str, value: str) -> None:
    assert await call("calculator", {"expression": expression}) == value


@pytest.mark.parametrize(
    ("expression", "error", "message"),
    [
        ("__import__('os').system('id')", ToolInputError, "attribute access is not allowed"),
        ("__import__('os')", ToolInputError, "unknown function '__import__' (available: abs,"),
        ("(1).real", ToolInputError, "attribute access is not allowed"),
        ("math.pi", ToolInputError, "attribute access is not allowed"),
        ("x + 1", ToolInputError, "unknown name 'x' (the constants are e, pi, tau)"),
        ("open", ToolInputError, "unknown name 'open'"),
        ("[1, 2][0]", ToolInputError, "Subscript expressions are not supported"),
        ("(lambda: 1)()", ToolInputError, "only these functions can be called"),
        ("'a' * 3", ToolInputError, "'a' cannot be calculated with"),
        ("2 ^ 3", ToolInputError, "write powers with **"),
        ("1 < 2", ToolInputError, "comparisons are not supported"),
        ("sqrt(x=4)", ToolInputError, "sqrt() takes plain positional arguments"),
        ("sqrt(1, 2)", ToolInputError, "sqrt() takes 1 argument"),
        ("1 +", ToolInputError, "not a valid expression"),
        ("", ToolInputError, "the expression is empty"),
        (
            "1" + "+1" * 600,
            ToolInputError,
            "expression: String should have at most 1000 characters",
        ),
        ("-" * 300 + "1", ToolInputError, "nests or chains more than 200 operations"),
        ("(" * 250 + "1" + ")" * 250, ToolInputError, "too many nested parentheses"),
        ("9 ** 9 ** 9", ToolFailure, "the result is too large"),
        ("10 ** 100000", ToolFailure, "the result is too large"),
        ("(10 ** 1000) * (10 ** 1000)", ToolFailure, "the result is too large"),
        ("2.0 ** 100000", ToolFailure, "the result is too large"),
        ("exp(1000)", ToolFailure, "the result is too large"),
        ("1e999", ToolFailure, "the result is too large"),
        ("1 / 0", ToolFailure, "division by zero"),
        ("5 % (3 - 3)", ToolFailure, "division by zero"),
        ("sqrt(-1)", ToolFailure, "sqrt() is undefined for -1"),
        ("(-8) ** (1 / 3)", ToolFailure, "not a real number"),
    ],
)
async def test_the_calculator_refuses_with_clear_errors(
    expression: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as refused:
        await call("calculator", {"expression": expression})
    assert message in str(refused.value)


def test_the_calculator_never_evaluates_python() -> None:
    with pytest.raises(Exception, match="longer than 1000 characters"):
        evaluate("1" + "+1" * 600)
    for attack in ["__import__('os').system('touch /tmp/pwned')", "().__class__", "exec('1')"]:
        with pytest.raises(Exception, match=r"not allowed|unknown function"):
            evaluate(attack)


# current_time ------------------------------------------------------------------------------------


def at(iso: str) -> ToolContext:
    instant = dt.datetime.fromisoformat(iso)
    return context(clock=lambda: instant)


async def test_current_time_in_a_time_zone() -> None:
    paris = await call("current_time", {"timezone": "Europe/Paris"}, at("2026-07-01T12:00:00Z"))
    assert paris == {
        "timezone": "Europe/Paris",
        "iso": "2026-07-01T14:00:00+02:00",
        "date": "2026-07-01",
        "time": "14:00:00",
        "weekday": "Wednesday",
        "utc_offset": "+02:00",
        "abbreviation": "CEST",
        "dst": True,
        "iso_week": "2026-W27",
        "unix": 1782907200,
    }
    utc = await call("current_time", {}, at("2026-01-04T23:30:00Z"))
    assert isinstance(utc, dict)
    assert (utc["iso"], utc["weekday"], utc["dst"]) == (
        "2026-01-04T23:30:00+00:00",
        "Sunday",
        False,
    )
    tokyo = await call("current_time", {"timezone": "asia/tokyo"}, at("2026-01-04T23:30:00Z"))
    assert isinstance(tokyo, dict)
    assert (tokyo["timezone"], tokyo["iso"]) == ("Asia/Tokyo", "2026-01-05T08:30:00+09:00")


async def test_an_unknown_time_zone_says_how_to_fix_it() -> None:
    with pytest.raises(ToolInputError) as typo:
        await call("current_time", {"timezone": "Europe/Pariss"})
    assert typo.value.message.startswith(
        "unknown time zone 'Europe/Pariss': did you mean 'Europe/Paris' or "
    )
    with pytest.raises(ToolInputError, match="did you mean 'America/New_York'"):
        await call("current_time", {"timezone": "New York"})
    for bad in ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime"]:
        with pytest.raises(ToolInputError, match=r"unknown time zone .*IANA name such as"):
            await call("current_time", {"timezone": bad})


# http_fetch --------------------------------------------------------------------------------------

PAGE = b"""<!doctype html>
<html><head><title>Heron &amp; friends</title><style>body { color: red }</style>
<script>alert("tracking")</script></head>
<body>
<nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<main>
<h1>Herons</h1>
<p>Herons are <strong>long-legged</strong> birds.
See <a href="https://en.wikipedia.org/wiki/Heron">the article</a>.</p>
<ul><li>Grey heron</li><li>Great blue heron</li></ul>
<img src="data:image/png;base64,iVBORw0KGgo=" alt="a heron">
</main>
<footer>Copyright nobody</footer>
</body></html>
"""


def site() -> Starlette:
    released = asyncio.Event()

    async def page(request: Request) -> Response:
        return Response(PAGE, media_type="text/html")

    async def latin1(request: Request) -> Response:
        return Response("café crème".encode("latin-1"), media_type="text/plain; charset=latin-1")

    async def data(request: Request) -> Response:
        return JSONResponse({"birds": ["heron", "egret"]})

    async def big(request: Request) -> Response:
        return PlainTextResponse("0123456789" * 10_000)

    async def image(request: Request) -> Response:
        return Response(b"\x89PNG\r\n\x1a\n" + b"\0" * 100, media_type="image/png")

    async def untyped(request: Request) -> Response:
        return Response(b"\x7fELF\x02\x01\x01\0\0\0" + bytes(range(256)))

    async def missing(request: Request) -> Response:
        return PlainTextResponse("no such page", status_code=404)

    async def slow(request: Request) -> Response:
        await asyncio.wait_for(released.wait(), timeout=10)
        return PlainTextResponse("too late")

    async def hop(request: Request) -> Response:
        return RedirectResponse(request.query_params["to"], status_code=302)

    app = Starlette(
        routes=[
            Route("/page", page),
            Route("/latin1", latin1),
            Route("/data.json", data),
            Route("/big", big),
            Route("/image.png", image),
            Route("/untyped", untyped),
            Route("/missing", missing),
            Route("/slow", slow),
            Route("/hop", hop),
        ]
    )
    app.state.released = released
    return app


LOCAL = context(network=NetGuard(allow_private_network=True))


async def test_http_fetch_turns_html_into_markdown_without_noise() -> None:
    async with serve(site()) as base:  # type: ignore[arg-type]
        text = await call("http_fetch", {"url": f"{base}/page"}, LOCAL)
    assert isinstance(text, str)
    assert text.startswith(f"URL: {base}/page\nContent-Type: text/html\nTitle: Heron & friends\n")
    assert "# Herons" in text
    assert "Herons are **long-legged** birds.\nSee [the article]" in text
    assert "[the article](https://en.wikipedia.org/wiki/Heron)" in text
    assert "- Grey heron\n- Great blue heron" in text
    assert "a heron" in text
    assert "base64" not in text
    for noise in ["alert", "tracking", "color: red", "About", "Copyright"]:
        assert noise not in text


async def test_http_fetch_returns_text_json_and_raw_html_as_they_are() -> None:
    async with serve(site()) as base:  # type: ignore[arg-type]
        latin1 = await call("http_fetch", {"url": f"{base}/latin1"}, LOCAL)
        data = await call("http_fetch", {"url": f"{base}/data.json"}, LOCAL)
        raw = await call("http_fetch", {"url": f"{base}/page", "raw": True}, LOCAL)
    assert isinstance(latin1, str)
    assert latin1.endswith("\n\ncafé crème")
    assert isinstance(data, str)
    assert "Content-Type: application/json" in data
    assert json.loads(data.split("\n\n", 1)[1]) == {"birds": ["heron", "egret"]}
    assert isinstance(raw, str)
    assert "<script>alert" in raw


async def test_http_fetch_refuses_binary_content_and_reports_http_errors() -> None:
    async with serve(site()) as base:  # type: ignore[arg-type]
        for path, message in [
            ("/image.png", f"refused: {base}/image.png is image/png, not text"),
            ("/untyped", f"refused: {base}/untyped has no Content-Type and looks binary"),
            ("/missing", f"{base}/missing answered HTTP 404 Not Found"),
        ]:
            with pytest.raises(ToolFailure) as failed:
                await call("http_fetch", {"url": base + path}, LOCAL)
            assert failed.value.message.startswith(message)


async def test_http_fetch_caps_the_download_and_windows_long_content() -> None:
    capped = replace(LOCAL, fetch_limits=FetchLimits(max_bytes=4096))
    async with serve(site()) as base:  # type: ignore[arg-type]
        text = await call("http_fetch", {"url": f"{base}/big", "max_length": 100_000}, capped)
        first = await call("http_fetch", {"url": f"{base}/big", "max_length": 1000}, LOCAL)
        later = await call(
            "http_fetch", {"url": f"{base}/big", "start_index": 99_995, "max_length": 1000}, LOCAL
        )
        with pytest.raises(ToolInputError, match="start_index 200000 is past the end"):
            await call("http_fetch", {"url": f"{base}/big", "start_index": 200_000}, LOCAL)
    assert isinstance(text, str)
    assert isinstance(first, str)
    assert isinstance(later, str)
    body = text.split("\n\n")[1]
    assert body == ("0123456789" * 410)[:4096]
    assert text.endswith("[The response is larger than 4 KiB; only its first 4 KiB were read.]")
    assert first.split("\n\n")[1] == ("0123456789" * 100)
    assert "100000 characters in all. Call http_fetch again with start_index=1000" in first
    assert later.split("\n\n")[1] == "56789"
    assert "truncated" not in later


async def test_http_fetch_gives_up_after_its_timeout() -> None:
    app = site()
    hurried = replace(LOCAL, fetch_limits=FetchLimits(timeout_seconds=0.2))
    async with serve(app) as base:  # type: ignore[arg-type]
        with pytest.raises(ToolFailure, match=r"fetching .*/slow timed out after 0\.2 s"):
            await call("http_fetch", {"url": f"{base}/slow"}, hurried)
        app.state.released.set()


async def test_http_fetch_refuses_loopback_unless_the_workspace_allows_private_networks() -> None:
    async with serve(site()) as base:  # type: ignore[arg-type]
        assert "# Herons" in str(await call("http_fetch", {"url": f"{base}/page"}, LOCAL))
        with pytest.raises(ToolFailure) as refused:
            await call("http_fetch", {"url": f"{base}/page"})
    assert refused.value.message == "refused: 127.0.0.1 is a loopback address"
    assert not context().allow_private_network
    assert ToolContext.for_workspace(WORKSPACE, allow_private_network=True).allow_private_network


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1]/", "refused: ::1 is a loopback address"),
        ("http://169.254.169.254/latest/", "refused: 169.254.169.254 is a cloud metadata address"),
        ("http://0.0.0.0/", "refused: 0.0.0.0 is an unspecified address"),
        (
            "http://[::ffff:127.0.0.1]/",
            "refused: ::ffff:127.0.0.1 is 127.0.0.1, a loopback address",
        ),
        ("http://2130706433/", "refused: 2130706433 is 127.0.0.1, a loopback address"),
        ("http://0177.0.0.1/", "refused: 'http://0177.0.0.1/' is not a valid URL"),
        ("http://10.0.0.5/", "refused: 10.0.0.5 is a private address"),
        ("ftp://example.com/", "refused: only http and https URLs can be fetched, not ftp:"),
    ],
)
async def test_http_fetch_refuses_non_public_urls_with_a_one_line_reason(
    url: str, message: str
) -> None:
    with pytest.raises(ToolFailure) as refused:
        await call("http_fetch", {"url": url})
    assert refused.value.message.startswith(message)
    assert "\n" not in refused.value.message


async def test_http_fetch_refuses_a_redirect_from_a_public_host_to_a_private_one() -> None:
    def loopback_is_public(ip: IPAddress) -> str | None:
        return None if ip == ipaddress.IPv4Address("127.0.0.1") else non_public_reason(ip)

    async def dns(host: str) -> Sequence[IPAddress]:
        return [ipaddress.ip_address({"public.example": "127.0.0.1"}[host])]

    ctx = context(network=NetGuard(policy=loopback_is_public, allowed_ports=None, resolver=dns))
    async with serve(site()) as base:  # type: ignore[arg-type]
        public = f"http://public.example:{httpx.URL(base).port}"
        assert "# Herons" in str(await call("http_fetch", {"url": f"{public}/page"}, ctx))
        hop = httpx.URL(f"{public}/hop", params={"to": "http://127.0.0.2/page"})
        with pytest.raises(ToolFailure) as refused:
            await call("http_fetch", {"url": str(hop)}, ctx)
    assert refused.value.message == (
        f"refused: 127.0.0.2 is a loopback address (redirected from {hop})"
    )
