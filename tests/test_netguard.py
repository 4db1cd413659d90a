"""The SSRF guard: which URLs may be fetched, and fetching them with the checked address pinned.

Public addresses cannot be reached from the test machine, so tests that fetch use servers on
loopback and an injected policy or resolver that plays "public internet" (127.0.0.1 is public,
other addresses keep their real classification), never a packet to another address.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from conftest import serve
from heron.core.netguard import (
    FetchFailed,
    FetchLimits,
    IPAddress,
    NetGuard,
    UrlRefused,
    non_public_reason,
    open_url,
    resolve_host,
)

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


async def no_dns(host: str) -> Sequence[IPAddress]:
    raise AssertionError(f"{host} must not be resolved")


def fake_dns(table: dict[str, list[str]], calls: list[str] | None = None):  # type: ignore[no-untyped-def]
    async def resolve(host: str) -> Sequence[IPAddress]:
        if calls is not None:
            calls.append(host)
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


def loopback_is_public(ip: IPAddress) -> str | None:
    """A policy for tests: 127.0.0.1 plays a public server; everything else is judged as usual."""
    return None if ip == LOOPBACK else non_public_reason(ip)


def guard_for_tests(**kwargs) -> NetGuard:  # type: ignore[no-untyped-def]
    return NetGuard(policy=loopback_is_public, allowed_ports=None, **kwargs)


# Literal addresses and URL shapes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://10.0.0.5/", "refused: 10.0.0.5 is a private address"),
        ("http://172.16.3.4/", "refused: 172.16.3.4 is a private address"),
        ("http://192.168.1.1/", "refused: 192.168.1.1 is a private address"),
        ("http://127.0.0.1/", "refused: 127.0.0.1 is a loopback address"),
        ("http://[::1]/", "refused: ::1 is a loopback address"),
        ("http://0.0.0.0/", "refused: 0.0.0.0 is an unspecified address"),
        ("http://[::]/", "refused: :: is an unspecified address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
        ("http://169.254.10.10/", "refused: 169.254.10.10 is a link-local address"),
        ("http://[fe80::1]/", "refused: fe80::1 is a link-local address"),
        ("http://100.64.0.1/", "refused: 100.64.0.1 is a carrier-grade NAT address"),
        ("http://[fd12:3456::1]/", "refused: fd12:3456::1 is a private address"),
        ("http://224.0.0.1/", "refused: 224.0.0.1 is a multicast address"),
        ("http://[ff02::1]/", "refused: ff02::1 is a multicast address"),
        ("http://255.255.255.255/", "refused: 255.255.255.255 is a reserved address"),
        ("http://192.0.2.10/", "refused: 192.0.2.10 is a reserved address"),
        # Decimal, hexadecimal and shortened IPv4 spellings mean 127.0.0.1 to resolvers.
        ("http://2130706433/", "refused: 2130706433 is 127.0.0.1, a loopback address"),
        ("http://0x7f.1/", "refused: 0x7f.1 is 127.0.0.1, a loopback address"),
        ("http://127.1/", "refused: 127.1 is 127.0.0.1, a loopback address"),
        ("http://0177.0.0.1/", "refused: 'http://0177.0.0.1/' is not a valid URL"),
        # IPv6 wrappers of forbidden IPv4 addresses.
        (
            "http://[::ffff:127.0.0.1]/",
            "refused: ::ffff:127.0.0.1 is 127.0.0.1, a loopback address",
        ),
        ("http://[::ffff:a00:5]/", "refused: ::ffff:a00:5 is 10.0.0.5, a private address"),
        ("http://[2002:a00:5::1]/", "2002:a00:5::1 is a 6to4 form of 10.0.0.5, a private address"),
        ("http://[64:ff9b::a00:5]/", "64:ff9b::a00:5 is a NAT64 form of 10.0.0.5, a private"),
        ("http://[::7f00:1]/", "::7f00:1 is an IPv4-compatible form of 127.0.0.1, a loopback"),
        (
            # Teredo: client 127.0.0.1, obfuscated as the low 32 bits inverted.
            "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
            "is a Teredo form of 127.0.0.1, a loopback address",
        ),
    ],
)
async def test_non_public_addresses_are_refused_without_dns(url: str, message: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        await NetGuard(resolver=no_dns).resolve(url)
    assert message in refused.value.detail
    assert refused.value.detail.startswith("refused: ")
    assert "\n" not in refused.value.detail


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/file", "only http and https URLs can be fetched, not ftp:"),
        ("file:///etc/passwd", "only http and https URLs can be fetched, not file:"),
        ("gopher://example.com/", "not gopher:"),
        ("example.com/page", "not a URL without a scheme"),
        ("http://user:secret@example.com/", "credentials (user:password@host) are not allowed"),
        ("http://example.com:22/", "port 22 is not allowed (allowed ports: 80, 443, 8080, 8443)"),
        ("http://example.com:6379/", "port 6379 is not allowed"),
        ("http://metadata.google.internal/computeMetadata/v1/", "is a cloud metadata host"),
        ("http://METADATA.google.internal./", "is a cloud metadata host"),
        ("http://[fe80::1%25eth0]/", "zone identifiers are not allowed"),
        ("http:///nohost", "has no host"),
        ("http://exa mple.com/", "is not a valid host name"),
        ("http://a..b/", "is not a valid host name"),
    ],
)
async def test_unsafe_url_shapes_are_refused(url: str, message: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        await NetGuard(resolver=no_dns).resolve(url)
    assert message in refused.value.detail


async def test_public_addresses_and_standard_ports_are_allowed() -> None:
    guard = NetGuard(resolver=no_dns)
    for url, address in [
        ("http://8.8.8.8/", "8.8.8.8"),
        ("https://[2606:4700:4700::1111]/dns-query", "2606:4700:4700::1111"),
        ("http://[::ffff:8.8.4.4]/", "8.8.4.4"),  # an IPv4-mapped public address is that address
        ("https://1.1.1.1:8443/", "1.1.1.1"),
    ]:
        destination = await guard.resolve(url)
        assert destination.addresses == (ipaddress.ip_address(address),)
    named = await NetGuard(resolver=fake_dns({"example.com": ["93.184.215.14"]})).resolve(
        "https://example.com/a#frag"
    )
    assert str(named.url) == "https://example.com/a"
    assert named.host == "example.com"


async def test_every_address_a_name_resolves_to_must_be_public() -> None:
    guard = NetGuard(resolver=fake_dns({"mixed.example": ["93.184.215.14", "10.0.0.5"]}))
    with pytest.raises(UrlRefused) as refused:
        await guard.resolve("http://mixed.example/")
    assert refused.value.detail == "refused: mixed.example resolves to 10.0.0.5, a private address"


async def test_allowing_private_networks_allows_loopback_and_any_port_but_never_metadata() -> None:
    guard = NetGuard(
        allow_private_network=True,
        resolver=fake_dns({"box.internal": ["10.1.2.3"], "imds.example": ["169.254.169.254"]}),
    )
    assert (await guard.resolve("http://127.0.0.1:5432/")).addresses == (LOOPBACK,)
    assert (await guard.resolve("http://box.internal:8000/")).host == "box.internal"
    for url, message in [
        ("http://169.254.169.254/", "169.254.169.254 is a cloud metadata address"),
        ("http://[::ffff:169.254.169.254]/", "is 169.254.169.254, a cloud metadata address"),
        ("http://[fd00:ec2::254]/", "fd00:ec2::254 is a cloud metadata address"),
        ("http://metadata.google.internal/", "metadata.google.internal is a cloud metadata host"),
        ("http://imds.example/", "imds.example resolves to 169.254.169.254, a cloud metadata"),
    ]:
        with pytest.raises(UrlRefused) as refused:
            await guard.resolve(url)
        assert message in refused.value.detail


async def test_the_system_resolver_returns_every_address_and_localhost_is_refused() -> None:
    addresses = await resolve_host("localhost")
    assert LOOPBACK in addresses or ipaddress.ip_address("::1") in addresses
    with pytest.raises(UrlRefused, match=r"localhost resolves to .*a loopback address"):
        await NetGuard().resolve("http://localhost/")
    with pytest.raises(FetchFailed, match=r"could not resolve nothing\.invalid"):
        await NetGuard().resolve("http://nothing.invalid/")


# Fetching --------------------------------------------------------------------------------------


def echo_app() -> Starlette:
    seen: list[dict[str, str]] = []

    async def echo(request: Request) -> Response:
        seen.append(dict(request.headers))
        return PlainTextResponse(f"host={request.headers['host']}")

    async def hop(request: Request) -> Response:
        seen.append(dict(request.headers))
        return RedirectResponse(request.query_params["to"], status_code=302)

    async def loop(request: Request) -> Response:
        return RedirectResponse("/loop", status_code=307)

    async def bomb(request: Request) -> Response:
        body = gzip.compress(b"\0" * (8 * 1024 * 1024))
        return Response(body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    app = Starlette(
        routes=[
            Route("/echo", echo),
            Route("/hop", hop),
            Route("/loop", loop),
            Route("/bomb", bomb),
        ]
    )
    app.state.seen = seen
    return app


async def test_a_name_is_resolved_once_and_the_checked_address_is_connected_to() -> None:
    app = echo_app()
    async with serve(app) as base:  # type: ignore[arg-type]
        port = httpx.URL(base).port
        calls: list[str] = []
        rebinding = iter([["127.0.0.1"], ["10.0.0.5"]])  # a second lookup would get 10.0.0.5

        async def resolver(host: str) -> Sequence[IPAddress]:
            calls.append(host)
            return [ipaddress.ip_address(a) for a in next(rebinding)]

        guard = guard_for_tests(resolver=resolver)
        async with open_url(f"http://public.example:{port}/echo", guard=guard) as fetched:
            body = await fetched.read()
        # httpx never looked the name up itself (it cannot resolve public.example at all), and
        # the Host header still names the host, not the address.
        assert body == f"host=public.example:{port}".encode()
        assert calls == ["public.example"]
        assert str(fetched.url) == f"http://public.example:{port}/echo"


async def test_a_redirect_to_a_forbidden_address_is_refused_before_connecting() -> None:
    app = echo_app()
    async with serve(app) as base:  # type: ignore[arg-type]
        port = httpx.URL(base).port
        guard = guard_for_tests(
            resolver=fake_dns({"public.example": ["127.0.0.1"], "intranet.example": ["10.0.0.5"]})
        )
        cases = [
            (f"http://127.0.0.2:{port}/echo", "refused: 127.0.0.2 is a loopback address"),
            ("http://intranet.example/", "intranet.example resolves to 10.0.0.5, a private"),
            ("http://169.254.169.254/latest/meta-data/", "is a cloud metadata address"),
            ("http://[::1]/", "refused: ::1 is a loopback address"),
            ("file:///etc/passwd", "only http and https URLs can be fetched"),
        ]
        for target, message in cases:
            start = httpx.URL(f"http://public.example:{port}/hop", params={"to": target})
            with pytest.raises(UrlRefused) as refused:
                async with open_url(start, guard=guard):
                    pytest.fail("the redirect was followed")
            assert message in refused.value.detail
            assert f"(redirected from http://public.example:{port}/hop" in refused.value.detail
        assert len(app.state.seen) == len(cases)  # only the first hops reached a server


async def test_redirects_are_followed_up_to_the_limit_and_credentials_stay_with_their_origin() -> (
    None
):
    app = echo_app()
    async with serve(app) as base:  # type: ignore[arg-type]
        port = httpx.URL(base).port
        guard = guard_for_tests(
            resolver=fake_dns({"a.example": ["127.0.0.1"], "b.example": ["127.0.0.1"]})
        )
        start = httpx.URL(
            f"http://a.example:{port}/hop", params={"to": f"http://b.example:{port}/echo"}
        )
        async with open_url(
            start, guard=guard, headers={"Authorization": "Bearer for-a", "X-Trace": "1"}
        ) as fetched:
            assert await fetched.read() == f"host=b.example:{port}".encode()
        assert fetched.redirects == (start,)
        first, second = app.state.seen
        assert first["authorization"] == "Bearer for-a"
        assert "authorization" not in second
        assert second["x-trace"] == "1"

        limits = FetchLimits(max_redirects=3)
        with pytest.raises(FetchFailed, match="redirected more than 3 times"):
            async with open_url(f"http://a.example:{port}/loop", guard=guard, limits=limits):
                pass


async def test_the_body_cap_bounds_decompressed_bytes() -> None:
    async with serve(echo_app()) as base:  # type: ignore[arg-type]
        limits = FetchLimits(max_bytes=100_000)
        guard = NetGuard(allow_private_network=True)
        async with open_url(f"{base}/bomb", guard=guard, limits=limits) as fetched:
            assert fetched.response.headers["content-encoding"] == "gzip"
            body = await fetched.read()
        assert body == b"\0" * 100_000
        assert fetched.truncated

        async with open_url(f"{base}/echo", guard=guard, limits=limits) as fetched:
            assert await fetched.read() == f"host={httpx.URL(base).netloc.decode()}".encode()
        assert not fetched.truncated


# TLS: the connection goes to the checked address, SNI and the certificate check use the name ----


def make_certificate(tmp_path: Path, name: str) -> tuple[Path, Path, bytes]:
    """A CA and a certificate for `name` it signed: (cert file, key file, CA PEM)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Heron test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, ca.public_bytes(serialization.Encoding.PEM)


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_tls(app: Starlette, cert: Path, key: Path) -> AsyncIterator[int]:
    import asyncio

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_https_connects_to_the_checked_address_and_verifies_the_certificate_for_the_name(
    tmp_path: Path,
) -> None:
    cert, key, ca = make_certificate(tmp_path, "public.example")
    trust = ssl.create_default_context(cadata=ca.decode())
    async with serve_tls(echo_app(), cert, key) as port:
        guard = guard_for_tests(
            resolver=fake_dns({"public.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
        )
        url = f"https://public.example:{port}/echo"
        async with open_url(url, guard=guard, ssl_context=trust) as fetched:
            assert await fetched.read() == f"host=public.example:{port}".encode()
        # Same address, another name: the certificate does not match it, so no connection.
        with pytest.raises(FetchFailed, match="CERTIFICATE_VERIFY_FAILED"):
            async with open_url(
                f"https://other.example:{port}/echo", guard=guard, ssl_context=trust
            ):
                pass
