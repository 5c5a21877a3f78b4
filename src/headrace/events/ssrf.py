"""Which webhook URLs Headrace will call: keeping callers' URLs away from internal services.

A webhook URL comes from the caller, so without a check it is a way to make Headrace send
requests to its own network (server-side request forgery): a database's HTTP port, an admin
endpoint, the cloud metadata service that hands out credentials. Three checks, in order:

1. :func:`validate_webhook_url` (no I/O, at submit time and before each attempt): http or
   https, no ``user:password@``, a host; an IP literal must be public; a legacy numeric IPv4
   form (``2130706433``, ``0x7f.1``) is refused outright; ``localhost`` names are loopback.
2. :func:`resolve_and_check` (at submit time): resolves the host and refuses it if any of its
   addresses is not public, so a bad URL is rejected while the caller is still there.
3. :class:`GuardedResolver` (at delivery): an aiohttp resolver that checks every address it
   returns, so a name that resolved to a public address at submit time and to ``127.0.0.1``
   now (DNS rebinding) is refused before a connection is made. aiohttp does not consult the
   resolver for IP literals, which is why check 1 runs before each attempt too.

Refused: loopback, private (RFC 1918, unique-local ``fc00::/7``), link-local, multicast,
reserved, unspecified, shared (CGNAT ``100.64/10``) and any other non-global address, IPv6
forms that embed one of those (IPv4-mapped, 6to4, NAT64), and cloud metadata addresses.
``allow_private=True`` (config ``jobs.webhooks.allow_private_targets``) lets all of those
through except metadata addresses; a host listed in ``allow_hosts`` (config
``jobs.webhooks.allow_hosts``) skips the address checks entirely, metadata included.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from typing import Final

import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from headrace.errors import ValidationFailedError

__all__ = [
    "ALLOW_HOSTS_KEY",
    "ALLOW_PRIVATE_KEY",
    "GuardedResolver",
    "IPAddress",
    "StaticResolver",
    "UnsafeWebhookUrlError",
    "address_refusal",
    "resolve_and_check",
    "validate_webhook_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_PRIVATE_KEY: Final = "jobs.webhooks.allow_private_targets"
ALLOW_HOSTS_KEY: Final = "jobs.webhooks.allow_hosts"

_SCHEMES = frozenset({"http", "https"})
_METADATA: Final = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean …
        "169.254.170.2",  # AWS ECS task credentials
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class UnsafeWebhookUrlError(ValidationFailedError):
    """A webhook URL (or an address its host resolved to) that Headrace will not call.

    ``reason`` is the short why (``"loopback address 127.0.0.1"``); the message adds what to
    change. Messages show only scheme, host and port: a URL's query often holds a token.
    """

    def __init__(self, message: str, *, reason: str, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.reason = reason


def address_refusal(ip: IPAddress, *, allow_private: bool) -> str | None:
    """Why ``ip`` may not be called (``"private address 10.0.0.1"``), or None if it may.

    With ``allow_private`` only metadata addresses are refused.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            ipv4, decisive = embedded
            inner = address_refusal(ipv4, allow_private=allow_private)
            if inner is not None:
                return inner if ip.ipv4_mapped else f"{inner} (embedded in {ip})"
            if decisive:
                return None
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(str(ip).partition("%")[0])
    if ip in _METADATA:
        return f"cloud metadata address {ip}"
    if allow_private:
        return None
    # Most specific first, so the message names the range the operator will recognise.
    kinds = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-public", not ip.is_global),
    )
    return next((f"{kind} address {ip}" for kind, matches in kinds if matches), None)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, bool] | None:
    """The IPv4 address an IPv6 one stands for, and whether that address alone decides.

    The kernel sends to an IPv4-mapped address as to the IPv4 address itself, and a NAT64
    gateway (DNS64 answers on IPv6-only hosts) forwards to the embedded one: both decide. A
    6to4 address is routed through a relay towards the embedded one, and must pass as IPv6 too.
    """
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, True
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), True
    if ip.sixtofour is not None:
        return ip.sixtofour, False
    return None


def validate_webhook_url(
    url: str, *, allow_private: bool, allow_hosts: frozenset[str] = frozenset()
) -> str:
    """The URL, normalised, if it may be called as far as can be told without DNS; else raise
    :class:`UnsafeWebhookUrlError`.

    Checks scheme (http/https), no userinfo, a host, and, for an IP literal, the address.
    A host name still needs :func:`resolve_and_check` (submit time) and
    :class:`GuardedResolver` (delivery). ``allow_hosts`` holds host names or IP literals,
    lowercase, that skip the address checks.
    """
    try:
        parsed = yarl.URL(url)
    except (ValueError, TypeError):
        raise _error(
            "it is not a valid URL", "not a URL", fix="Give an absolute http(s) URL."
        ) from None
    shown = _shown(parsed)
    if parsed.scheme not in _SCHEMES:
        raise _error(
            f"{shown} uses scheme {parsed.scheme!r}",
            f"scheme {parsed.scheme!r}",
            fix="Webhook URLs must be http:// or https://.",
        )
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise _error(
            f"{shown} carries credentials before the host",
            "userinfo in URL",
            fix="Remove 'user:password@'; the webhook signature authenticates Headrace.",
        )
    host = _host_key(parsed)
    if not host or parsed.host is None:
        raise _error(f"{url[:64]!r} has no host", "no host", fix="Give an absolute http(s) URL.")
    if host in _normalised(allow_hosts):
        return str(parsed)
    ip = _ip_literal(parsed.host)
    if ip is not None:
        _check_address(shown, ip, allow_private=allow_private)
    elif _is_legacy_ipv4(host):
        raise _error(
            f"{shown} writes an IPv4 address in a legacy numeric form",
            f"non-canonical IPv4 host {host!r}",
            fix="Write the address as four decimal octets (for example 203.0.113.7).",
        )
    elif not allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise _error(
            f"{shown} names localhost, which is loopback",
            "loopback host name",
            fix=_private_fix(),
        )
    return str(parsed)


async def resolve_and_check(
    url: str,
    *,
    allow_private: bool,
    allow_hosts: frozenset[str] = frozenset(),
    resolver: AbstractResolver | None = None,
) -> list[IPAddress]:
    """Validate ``url`` and resolve its host; return the addresses, or raise
    :class:`UnsafeWebhookUrlError` if any of them may not be called or the host does not
    resolve. Use at submit time, to refuse a bad URL while the caller can still fix it.

    ``resolver`` defaults to :class:`aiohttp.ThreadedResolver` (``getaddrinfo`` through the
    running loop). Hosts in ``allow_hosts`` are not resolved; an empty list comes back.
    """
    checked = yarl.URL(
        validate_webhook_url(url, allow_private=allow_private, allow_hosts=allow_hosts)
    )
    host = _host_key(checked)
    if host in _normalised(allow_hosts):
        return []
    assert checked.host is not None  # validate_webhook_url refuses a URL without one
    literal = _ip_literal(checked.host)
    if literal is not None:
        return [literal]
    port = checked.port or 0
    own = resolver is None
    active = ThreadedResolver() if resolver is None else resolver
    try:
        results = await active.resolve(host, port, family=socket.AF_UNSPEC)
    except OSError as exc:
        raise _error(
            f"the host of {_shown(checked)} does not resolve ({exc.__class__.__name__})",
            "host does not resolve",
            fix="Check the host name.",
        ) from None
    finally:
        if own:
            await active.close()
    return _check_results(_shown(checked), results, allow_private=allow_private)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses a host if any address it resolves to may not be called.

    Use as ``aiohttp.TCPConnector(resolver=GuardedResolver(allow_private=...))``: the check
    then runs at connect time on the addresses actually connected to, which defeats DNS
    rebinding. The refusal raises :class:`UnsafeWebhookUrlError` out of the request. aiohttp
    never calls a resolver for an IP-literal URL, so pair this with
    :func:`validate_webhook_url` on every URL sent through the connector.

    ``inner`` does the resolving (default :class:`aiohttp.ThreadedResolver`, created on first
    use on the running loop); a test passes a fake one to simulate DNS.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        allow_hosts: frozenset[str] = frozenset(),
        inner: AbstractResolver | None = None,
    ) -> None:
        self._allow_private = allow_private
        self._allow_hosts = _normalised(allow_hosts)
        self._inner = inner
        self._owns_inner = inner is None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        key = host.lower().rstrip(".")
        if key not in self._allow_hosts:
            shown = f"{key}:{port}" if port else key
            _check_results(shown, results, allow_private=self._allow_private)
        return results

    async def close(self) -> None:
        if self._owns_inner and self._inner is not None:
            await self._inner.close()


class StaticResolver(AbstractResolver):
    """An in-memory resolver with fixed answers, the test fake for DNS (and a way to pin a
    host). ``answers`` maps a host name to its addresses; an unknown name fails the way DNS
    does, with :class:`socket.gaierror`. Wrap it in :class:`GuardedResolver`, or pass it as
    ``resolver=`` to :func:`resolve_and_check` or the webhook sender."""

    def __init__(self, answers: Mapping[str, Sequence[str]]) -> None:
        self._answers = {host.lower(): tuple(found) for host, found in answers.items()}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        for text in self._answers.get(host.lower().rstrip("."), ()):
            found = socket.AF_INET6 if ":" in text else socket.AF_INET
            if family in (socket.AF_UNSPEC, found):
                results.append(
                    ResolveResult(
                        hostname=host,
                        host=text,
                        port=port,
                        family=found,
                        proto=0,
                        flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                    )
                )
        if not results:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the static resolver")
        return results

    async def close(self) -> None:
        pass


def _check_results(
    shown: str, results: list[ResolveResult], *, allow_private: bool
) -> list[IPAddress]:
    if not results:
        raise _error(
            f"the host of {shown} resolves to no address",
            "host does not resolve",
            fix="Check the host name.",
        )
    addresses: list[IPAddress] = []
    for result in results:
        ip = _ip_literal(result["host"])
        if ip is None:
            raise _error(
                f"the host of {shown} resolved to {result['host']!r}, not an address",
                "unparseable resolver answer",
                fix="Check the host's DNS records.",
            )
        _check_address(shown, ip, allow_private=allow_private)
        addresses.append(ip)
    return addresses


def _check_address(shown: str, ip: IPAddress, *, allow_private: bool) -> None:
    reason = address_refusal(ip, allow_private=allow_private)
    if reason is None:
        return
    if reason.startswith("cloud metadata"):
        fix = (
            f"{ALLOW_PRIVATE_KEY} does not open metadata addresses; only listing the host in "
            f"{ALLOW_HOSTS_KEY} does, and it almost certainly should not be."
        )
    else:
        fix = _private_fix()
    raise _error(f"{shown} reaches a {reason}", reason, fix=fix)


def _private_fix() -> str:
    return (
        "Webhooks go to public addresses only. To deliver to your own network, set "
        f"{ALLOW_PRIVATE_KEY}: true, or list the host in {ALLOW_HOSTS_KEY}."
    )


def _error(what: str, reason: str, *, fix: str) -> UnsafeWebhookUrlError:
    return UnsafeWebhookUrlError(f"Refused webhook URL: {what}. {fix}", reason=reason)


def _shown(url: yarl.URL) -> str:
    """Scheme, host and port only: paths and queries of webhook URLs often hold tokens."""
    if url.raw_host is None:
        return repr(url.scheme + "://")
    host = f"[{url.raw_host}]" if ":" in url.raw_host else url.raw_host
    port = "" if url.port is None or url.is_default_port() else f":{url.port}"
    return f"{url.scheme}://{host}{port}"


def _host_key(url: yarl.URL) -> str:
    """The host as resolved and as matched against ``allow_hosts``: IDNA-encoded, lowercase,
    without a trailing dot."""
    return (url.raw_host or "").lower().rstrip(".")


def _normalised(hosts: frozenset[str]) -> frozenset[str]:
    return frozenset(h.lower().strip("[]").rstrip(".") for h in hosts)


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_legacy_ipv4(host: str) -> bool:
    """Whether ``inet_aton`` would read ``host`` as an IPv4 address (``2130706433``,
    ``0x7f.1``, ``017700000001``, ``127.1``) although it is not a dotted quad."""
    if not host or not all(c in "0123456789abcdefx." for c in host):
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True
