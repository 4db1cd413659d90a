"""Outbound HTTP to URLs that users and models choose, without reaching what they must not (SSRF).

`NetGuard` decides whether a URL may be fetched; `open_url` fetches it under that decision.

The policy, unless the workspace allows private networks:
- http and https only, no credentials in the URL (`user:pass@host`);
- ports 80, 443, 8080 and 8443 only: other ports on the public internet are more often
  non-HTTP services (SMTP, Redis, databases) than web pages, and an agent has no business probing
  them. `NetGuard(allowed_ports=None)` lifts this;
- the host's addresses are resolved (every A and AAAA record) and every one must be public: not
  loopback, private (RFC 1918, fc00::/7), carrier-grade NAT (100.64/10), link-local (169.254/16,
  fe80::/10), unspecified, multicast, reserved or documentation ranges, nor an IPv6 wrapper of such
  an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64). Numeric spellings that the
  C resolver accepts (`2130706433`, `0x7f.1`, `127.1`) are read as the address they denote.

Whatever the workspace allows, cloud metadata endpoints (169.254.169.254 and friends, and names
such as metadata.google.internal) are always refused: a private wiki is a reason to allow private
networks; handing the machine's cloud credentials to a model never is.

Every redirect is followed by hand and checked like the first URL. The connection goes to the
address that was checked (no second DNS lookup, so DNS rebinding cannot swap it), while the Host
header, TLS SNI and certificate verification use the original host name. Proxy settings from the
environment are ignored, since a proxy would resolve names itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import re
import socket
import ssl
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import httpx

from heron import __version__
from heron.core.errors import BadRequest, HeronError

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy: TypeAlias = Callable[[IPAddress], str | None]
"""Why an address must not be reached (a phrase such as "a private address"), or None."""
Resolver: TypeAlias = Callable[[str], Awaitable[Sequence[IPAddress]]]
"""Every address a host name resolves to."""

WEB_PORTS = frozenset({80, 443, 8080, 8443})
MAX_URL_LENGTH = 8192


class UrlRefused(BadRequest):
    """The URL points somewhere Heron will not connect to; `detail` starts with "refused:"."""

    slug, title = "url-refused", "URL refused"

    def __init__(self, reason: str) -> None:
        super().__init__(f"refused: {reason}")
        self.reason = reason


class FetchFailed(HeronError):
    """The URL was allowed, but fetching it failed (DNS, connection, timeout, protocol)."""

    status, slug, title = 502, "fetch-failed", "Fetch failed"


# Addresses ---------------------------------------------------------------------------------------

_PRIVATE = "a private address"
_RESERVED = "a reserved address"

_IPV4_RANGES: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "an unspecified address"),
        ("10.0.0.0/8", _PRIVATE),
        ("100.64.0.0/10", "a carrier-grade NAT address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),
        ("172.16.0.0/12", _PRIVATE),
        ("192.0.0.0/24", _RESERVED),  # IETF protocol assignments
        ("192.0.2.0/24", _RESERVED),  # documentation
        ("192.88.99.0/24", _RESERVED),  # deprecated 6to4 relays
        ("192.168.0.0/16", _PRIVATE),
        ("198.18.0.0/15", _RESERVED),  # benchmarking
        ("198.51.100.0/24", _RESERVED),  # documentation
        ("203.0.113.0/24", _RESERVED),  # documentation
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", _RESERVED),  # includes the broadcast address
    )
)
_IPV6_RANGES: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", _PRIVATE),  # deprecated site-local
        ("fc00::/7", _PRIVATE),
        ("ff00::/8", "a multicast address"),
        ("100::/64", _RESERVED),  # discard
        ("2001:db8::/32", _RESERVED),  # documentation
        ("3fff::/20", _RESERVED),  # documentation
    )
)
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))

_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean, OpenStack, ...
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS pod identity
        "168.63.129.16",  # Azure WireServer (a public address)
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud Classic
        "169.254.42.42",  # Scaleway
        "169.254.0.23",  # Tencent Cloud
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
        "fd20:ce::254",  # GCP over IPv6
    )
)
_METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
    }
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 transition address delivers to, with the mechanism's name."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped form", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "a 6to4 form", ip.sixtofour
    if ip.teredo is not None:
        return "a Teredo form", ip.teredo[1]
    if any(ip in net for net in _NAT64):
        return "a NAT64 form", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:
        return "an IPv4-compatible form", ipaddress.IPv4Address(int(ip))
    return None


def metadata_reason(ip: IPAddress) -> str | None:
    """Refuses cloud metadata endpoints, also wrapped in IPv6, even on private networks."""
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)):
        form, v4 = embedded
        if v4 in _METADATA_ADDRESSES:
            return f"{form} of {v4}, a cloud metadata address"
    return None


def non_public_reason(ip: IPAddress) -> str | None:
    """The default policy: refuse every address that is not on the public internet."""
    if isinstance(ip, ipaddress.IPv4Address):
        for net4, why in _IPV4_RANGES:
            if ip in net4:
                return why
    else:
        if embedded := _embedded_ipv4(ip):
            form, v4 = embedded
            if inner := non_public_reason(v4):
                return f"{form} of {v4}, {inner}"
            if ip.ipv4_mapped is not None:  # delivered to the IPv4 address, which is public
                return None
        for net6, why in _IPV6_RANGES:
            if ip in net6:
                return why
    # A safety net for special-purpose ranges the tables above do not name (Teredo, ORCHID, ...).
    return None if ip.is_global else _RESERVED


_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?", re.I)  # ASCII (IDNA) form
_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}\.?", re.I)


def parse_ip_host(host: str) -> IPAddress | None:
    """The address a URL host denotes literally, including the C resolver's numeric spellings.

    `2130706433`, `0x7f.1` and `127.1` all mean 127.0.0.1 to `getaddrinfo` and to browsers, so
    they are read as that address rather than handed to a resolver as if they were names.
    IPv4-mapped IPv6 (`::ffff:10.0.0.1`) is read as the IPv4 address it carries.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _NUMERIC_HOST.fullmatch(host):
            return None
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            raise UrlRefused(f"{host} is not a valid IPv4 address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _plain_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def resolve_host(host: str) -> list[IPAddress]:
    """Every address `host` resolves to (A and AAAA), by the system resolver, off the event loop."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchFailed(f"could not resolve {host}: {exc.strerror}") from exc
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        # A link-local IPv6 answer carries a zone ("fe80::1%eth0"); the address itself decides.
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip not in addresses:
            addresses.append(ip)
    return addresses


# The guard ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """A checked URL and the addresses that may be connected to for it."""

    url: httpx.URL
    """Without credentials or fragment; a numeric host spelled as its canonical address."""
    host: str
    """The host as sent in Host and TLS SNI: an ASCII (IDNA) name or an IP address."""
    addresses: tuple[IPAddress, ...]
    """Every address the host resolved to, all allowed; connect to these and nothing else."""


@dataclass(frozen=True, kw_only=True)
class NetGuard:
    """Which URLs may be fetched. `policy` and `resolver` are seams for tests and deployments."""

    allow_private_network: bool = False
    allowed_ports: frozenset[int] | None = WEB_PORTS
    """Ports allowed unless private networks are; None allows every port."""
    policy: AddressPolicy = non_public_reason
    """Refuses addresses unless private networks are allowed (metadata is refused regardless)."""
    resolver: Resolver = resolve_host

    def address_reason(self, ip: IPAddress) -> str | None:
        """Why this guard refuses `ip`, or None when it may be connected to."""
        if reason := metadata_reason(ip):
            return reason
        return None if self.allow_private_network else self.policy(ip)

    def check_url(self, url: str | httpx.URL) -> tuple[httpx.URL, IPAddress | None]:
        """Check everything that needs no DNS; return the normalised URL and its literal address."""
        text = str(url).strip()
        if len(text) > MAX_URL_LENGTH:
            raise UrlRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
        try:
            parsed = httpx.URL(text)
        except httpx.InvalidURL as exc:
            raise UrlRefused(f"{text!r} is not a valid URL ({exc})") from exc
        if parsed.scheme not in ("http", "https"):
            scheme = f"{parsed.scheme}:" if parsed.scheme else "a URL without a scheme"
            raise UrlRefused(f"only http and https URLs can be fetched, not {scheme}")
        if parsed.userinfo:
            raise UrlRefused("URLs with credentials (user:password@host) are not allowed")
        host = parsed.host
        if not host:
            raise UrlRefused(f"{text!r} has no host")
        if ":" in host and "%" in host:
            raise UrlRefused("IPv6 zone identifiers are not allowed in URLs")
        if host.rstrip(".").lower() in _METADATA_HOSTS:
            raise UrlRefused(f"{host} is a cloud metadata host")
        ip = parse_ip_host(host)
        if ip is not None:
            if reason := self.address_reason(ip):
                if _plain_ip(host) == ip:
                    raise UrlRefused(f"{host} is {reason}")
                raise UrlRefused(f"{host} is {ip}, {reason}")  # a disguise, unwrapped
            if str(ip) != host:
                parsed = parsed.copy_with(host=str(ip))
        elif not _HOST_NAME.fullmatch(parsed.raw_host.decode("ascii")):
            raise UrlRefused(f"{host!r} is not a valid host name")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if (
            not self.allow_private_network
            and self.allowed_ports is not None
            and port not in self.allowed_ports
        ):
            allowed = ", ".join(str(p) for p in sorted(self.allowed_ports))
            raise UrlRefused(f"port {port} is not allowed (allowed ports: {allowed})")
        return parsed.copy_with(fragment=None), ip

    async def resolve(self, url: str | httpx.URL) -> Destination:
        """Check `url` and resolve its host; every address must be allowed."""
        checked, ip = self.check_url(url)
        host = checked.raw_host.decode("ascii")
        if ip is not None:
            return Destination(checked, host, (ip,))
        addresses = tuple(await self.resolver(host))
        if not addresses:
            raise FetchFailed(f"could not resolve {host}: no addresses")
        for address in addresses:
            if reason := self.address_reason(address):
                raise UrlRefused(f"{host} resolves to {address}, {reason}")
        return Destination(checked, host, addresses)


# Fetching ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FetchLimits:
    max_bytes: int = 2 * 1024 * 1024
    """Body bytes read, after decompression; the rest is left unread and `truncated` is set."""
    timeout_seconds: float = 20.0
    """For the whole fetch: every redirect, connection and the body."""
    max_redirects: int = 5


USER_AGENT = f"Heron/{__version__}"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_DECODE_STEP = 64 * 1024


@dataclass
class Fetched:
    """The final response of a fetch, headers received, body unread."""

    url: httpx.URL
    """The URL that answered, after redirects (its host as given, not the address used)."""
    response: httpx.Response
    redirects: tuple[httpx.URL, ...]
    max_bytes: int
    truncated: bool = field(default=False, init=False)
    """Set once reading the body stopped at `max_bytes` with more left."""

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def content_type(self) -> str | None:
        """The media type, lower case and without parameters; None when the server sent none."""
        value = self.response.headers.get("content-type", "")
        return value.split(";", 1)[0].strip().lower() or None

    @property
    def charset(self) -> str | None:
        return self.response.charset_encoding

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body, decompressed, up to `max_bytes`."""
        remaining = self.max_bytes
        async with contextlib.aclosing(_decoded_body(self.response)) as chunks:
            async for chunk in chunks:
                if len(chunk) > remaining:
                    self.truncated = True
                    if remaining:
                        yield chunk[:remaining]
                    return
                remaining -= len(chunk)
                yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_bytes()])


@contextlib.asynccontextmanager
async def open_url(
    url: str | httpx.URL,
    *,
    guard: NetGuard,
    limits: FetchLimits = FetchLimits(),
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Fetched]:
    """GET `url` as `guard` allows, following redirects (each checked), body left to the caller.

    The caller inspects status and headers before reading (or refusing) the body, all within
    `limits.timeout_seconds`. Raises UrlRefused or FetchFailed; HTTP error statuses are returned,
    not raised. `ssl_context` replaces the default trust store (certifi, or `SSL_CERT_FILE`).
    """
    verify = (
        ssl_context if ssl_context is not None else await asyncio.to_thread(_default_ssl_context)
    )
    timeout = limits.timeout_seconds
    try:
        async with (
            asyncio.timeout(timeout),
            httpx.AsyncClient(
                verify=verify, trust_env=False, follow_redirects=False, timeout=timeout
            ) as client,
        ):
            fetched = await _follow(client, url, guard, limits, httpx.Headers(headers))
            try:
                yield fetched
            finally:
                await fetched.response.aclose()
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise FetchFailed(f"fetching {url} timed out after {timeout:g} s") from exc
    except httpx.HTTPError as exc:  # protocol and read errors; connection errors are handled below
        raise FetchFailed(f"fetching {url} failed: {exc}") from exc


async def _follow(
    client: httpx.AsyncClient,
    url: str | httpx.URL,
    guard: NetGuard,
    limits: FetchLimits,
    headers: httpx.Headers,
) -> Fetched:
    redirects: list[httpx.URL] = []
    target = url
    while True:
        try:
            destination = await guard.resolve(target)
        except UrlRefused as exc:
            if redirects:
                raise UrlRefused(f"{exc.reason} (redirected from {redirects[-1]})") from None
            raise
        response = await _send(client, destination, headers)
        location = response.headers.get("location")
        if response.status_code not in _REDIRECTS or location is None:
            return Fetched(destination.url, response, tuple(redirects), limits.max_bytes)
        await response.aclose()
        if len(redirects) >= limits.max_redirects:
            raise FetchFailed(f"{url} redirected more than {limits.max_redirects} times")
        redirects.append(destination.url)
        try:
            target = destination.url.join(location)
        except httpx.InvalidURL as exc:
            raise FetchFailed(f"{destination.url} redirected to invalid URL {location!r}") from exc
        if _origin(target) != _origin(destination.url):
            # Credentials the caller meant for one origin must not be handed to another.
            for name in _CREDENTIAL_HEADERS:
                headers.pop(name, None)


async def _send(
    client: httpx.AsyncClient, destination: Destination, headers: httpx.Headers
) -> httpx.Response:
    """One GET to the checked addresses in turn, never to a fresh lookup of the name."""
    request_headers = httpx.Headers({"User-Agent": USER_AGENT})
    request_headers.update(headers)
    request_headers["Host"] = destination.url.netloc.decode("ascii")
    request_headers["Accept-Encoding"] = "gzip"  # the only coding read with a bound on its output
    extensions = {}
    if destination.url.scheme == "https" and parse_ip_host(destination.host) is None:
        # TLS must name (SNI) and verify the certificate for the host, not the address.
        extensions["sni_hostname"] = destination.host.rstrip(".")
    failures: list[str] = []
    for address in destination.addresses:
        request = client.build_request(
            "GET",
            destination.url.copy_with(host=str(address)),
            headers=request_headers,
            extensions=extensions,
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            failures.append(f"{address}: {exc}")
            continue
        client.cookies.clear()  # the jar is keyed by address; no cookie crosses hops
        return response
    raise FetchFailed(f"could not connect to {destination.host} ({'; '.join(failures)})")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


async def _decoded_body(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The body without its content coding, in pieces of bounded size (no gzip bomb)."""
    codings = [
        coding
        for part in response.headers.get_list("content-encoding")
        for coding in (c.strip().lower() for c in part.split(","))
        if coding and coding != "identity"
    ]
    if not codings:
        async for raw in response.aiter_raw():
            yield raw
        return
    if codings not in (["gzip"], ["x-gzip"]):
        raise FetchFailed(f"unsupported Content-Encoding {', '.join(codings)}")
    decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        async for raw in response.aiter_raw():
            data = raw
            while data and not decompressor.eof:
                if out := decompressor.decompress(data, _DECODE_STEP):
                    yield out
                data = decompressor.unconsumed_tail
            if decompressor.eof:
                return
        if rest := decompressor.flush():
            yield rest
    except zlib.error as exc:
        raise FetchFailed(f"the response body is not valid gzip ({exc})") from exc


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()
