"""Webhook URL safety: what is refused, what is allowed, what the config keys open, and the
connect-time resolver check that defeats DNS rebinding."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from headrace.errors import ValidationFailedError
from headrace.events.ssrf import (
    ALLOW_HOSTS_KEY,
    ALLOW_PRIVATE_KEY,
    GuardedResolver,
    StaticResolver,
    UnsafeWebhookUrlError,
    address_refusal,
    resolve_and_check,
    validate_webhook_url,
)

PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"

DNS = StaticResolver(
    {
        "hooks.example.com": [PUBLIC_V4, PUBLIC_V6],
        "internal.example.com": ["10.0.0.5"],
        "mixed.example.com": [PUBLIC_V4, "192.168.1.20"],
        "metadata.example.com": ["169.254.169.254"],
        "v6-loopback.example.com": ["::1"],
        "mapped.example.com": ["::ffff:10.0.0.5"],
    }
)

# (url, a fragment of the reason) refused with allow_private=False, before any DNS.
REFUSED_STATIC = [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.255.0.9:8080/hook", "loopback"),
    ("http://localhost/hook", "loopback host name"),
    ("http://LOCALHOST./hook", "loopback host name"),
    ("http://api.localhost/hook", "loopback host name"),
    ("http://10.1.2.3/hook", "private"),
    ("http://192.168.0.10/hook", "private"),
    ("http://172.16.0.1/hook", "private"),
    ("http://172.31.255.254/hook", "private"),
    ("http://100.64.0.1/hook", "non-public"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://169.254.10.10/hook", "link-local"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://[::1]/hook", "loopback"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://[fe80::1%25eth0]/hook", "link-local"),
    ("http://[fc00::1]/hook", "private"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback address 127.0.0.1"),
    ("http://[::ffff:a00:1]/hook", "private address 10.0.0.1"),
    ("http://[64:ff9b::a9fe:a9fe]/", "cloud metadata"),
    ("http://[2002:7f00:1::]/hook", "loopback address 127.0.0.1 (embedded"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://[::]/hook", "unspecified"),
    ("http://224.0.0.1/hook", "multicast"),
    ("http://240.0.0.1/hook", "private"),
    ("http://2130706433/hook", "non-canonical IPv4"),
    ("http://0x7f000001/hook", "non-canonical IPv4"),
    ("http://0x7f.0.0.1/hook", "non-canonical IPv4"),
    ("http://017700000001/hook", "non-canonical IPv4"),
    ("http://127.1/hook", "non-canonical IPv4"),
    ("http://0/hook", "non-canonical IPv4"),
    ("ftp://hooks.example.com/hook", "scheme 'ftp'"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("gopher://hooks.example.com:70/", "scheme 'gopher'"),
    ("javascript:alert(1)", "scheme 'javascript'"),
    ("hooks.example.com/hook", "scheme ''"),
    ("http://user:pw@hooks.example.com/hook", "userinfo"),
    ("http://user@hooks.example.com/hook", "userinfo"),
    ("http:///hook", "no host"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED_STATIC)
def test_refused_without_dns(url: str, reason: str) -> None:
    with pytest.raises(UnsafeWebhookUrlError) as caught:
        validate_webhook_url(url, allow_private=False)
    assert reason in caught.value.reason


@pytest.mark.parametrize(("url", "reason"), REFUSED_STATIC)
async def test_resolve_and_check_refuses_them_too(url: str, reason: str) -> None:
    with pytest.raises(UnsafeWebhookUrlError) as caught:
        await resolve_and_check(url, allow_private=False, resolver=DNS)
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://internal.example.com/hook", "private address 10.0.0.5"),
        ("https://mixed.example.com/hook", "private address 192.168.1.20"),
        ("https://metadata.example.com/hook", "cloud metadata"),
        ("https://v6-loopback.example.com/hook", "loopback address ::1"),
        ("https://mapped.example.com/hook", "private address 10.0.0.5"),
        ("https://nowhere.example.com/hook", "does not resolve"),
    ],
)
async def test_refused_after_resolving(url: str, reason: str) -> None:
    validate_webhook_url(url, allow_private=False)  # the name alone says nothing
    with pytest.raises(UnsafeWebhookUrlError) as caught:
        await resolve_and_check(url, allow_private=False, resolver=DNS)
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/hook",
        "http://hooks.example.com:8080/a/b?c=d",
        "https://HOOKS.example.com./hook",
        f"https://{PUBLIC_V4}/hook",
        f"http://[{PUBLIC_V6}]:8443/hook",
        "http://[::ffff:5db8:d70e]/hook",  # IPv4-mapped public address
        "http://[64:ff9b::5db8:d70e]/hook",  # NAT64 of a public address
    ],
)
async def test_public_targets_are_allowed(url: str) -> None:
    assert validate_webhook_url(url, allow_private=False)
    addresses = await resolve_and_check(url, allow_private=False, resolver=DNS)
    assert addresses
    assert all(address_refusal(a, allow_private=False) is None for a in addresses)


async def test_resolve_and_check_returns_every_address() -> None:
    addresses = await resolve_and_check(
        "https://hooks.example.com/", allow_private=False, resolver=DNS
    )
    assert addresses == [ipaddress.ip_address(PUBLIC_V4), ipaddress.ip_address(PUBLIC_V6)]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://[::1]/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://[fe80::1]/hook",
        "https://internal.example.com/hook",
        "https://mixed.example.com/hook",
    ],
)
async def test_allow_private_lets_private_targets_through(url: str) -> None:
    validate_webhook_url(url, allow_private=True)
    assert await resolve_and_check(url, allow_private=True, resolver=DNS)


async def test_allow_private_with_real_dns_for_localhost() -> None:
    addresses = await resolve_and_check("http://localhost:9/hook", allow_private=True)
    assert addresses
    assert all(a.is_loopback for a in addresses)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:169.254.169.254]/",
        "https://metadata.example.com/hook",
    ],
)
async def test_allow_private_still_refuses_metadata(url: str) -> None:
    with pytest.raises(UnsafeWebhookUrlError) as caught:
        await resolve_and_check(url, allow_private=True, resolver=DNS)
    assert "cloud metadata" in caught.value.reason
    assert ALLOW_HOSTS_KEY in caught.value.message


async def test_allow_hosts_skips_the_address_checks() -> None:
    allow = frozenset({"internal.example.com", "169.254.169.254", "[::1]"})
    for url in (
        "https://Internal.Example.com./hook",
        "http://169.254.169.254/",
        "http://[::1]:8080/",
    ):
        validate_webhook_url(url, allow_private=False, allow_hosts=allow)
        await resolve_and_check(url, allow_private=False, allow_hosts=allow, resolver=DNS)
    # Only the listed host: the others stay refused.
    with pytest.raises(UnsafeWebhookUrlError):
        await resolve_and_check(
            "https://mixed.example.com/", allow_private=False, allow_hosts=allow, resolver=DNS
        )


def test_the_message_names_the_config_key_and_hides_the_path_and_query() -> None:
    with pytest.raises(UnsafeWebhookUrlError) as caught:
        validate_webhook_url(
            "http://10.0.0.7:9000/hooks/secret-path?token=s3cr3t", allow_private=False
        )
    message = caught.value.message
    assert ALLOW_PRIVATE_KEY == "jobs.webhooks.allow_private_targets"
    assert f"{ALLOW_PRIVATE_KEY}: true" in message
    assert "http://10.0.0.7:9000" in message
    assert "s3cr3t" not in message
    assert "secret-path" not in message


def test_it_renders_as_a_400() -> None:
    with pytest.raises(ValidationFailedError) as caught:
        validate_webhook_url("http://127.0.0.1/", allow_private=False)
    assert caught.value.status == 400
    assert caught.value.to_openai()["error"]["code"] == "invalid_value"


async def test_guarded_resolver_checks_what_it_resolves() -> None:
    guarded = GuardedResolver(allow_private=False, inner=DNS)
    results = await guarded.resolve("hooks.example.com", 443, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == [PUBLIC_V4, PUBLIC_V6]
    with pytest.raises(UnsafeWebhookUrlError) as caught:
        await guarded.resolve("mixed.example.com", 443, socket.AF_UNSPEC)
    assert "192.168.1.20" in caught.value.reason
    with pytest.raises(socket.gaierror):
        await guarded.resolve("nowhere.example.com", 443, socket.AF_UNSPEC)
    await guarded.close()


async def test_guarded_resolver_honours_the_policy() -> None:
    private_ok = GuardedResolver(allow_private=True, inner=DNS)
    assert await private_ok.resolve("internal.example.com", 80, socket.AF_UNSPEC)
    with pytest.raises(UnsafeWebhookUrlError, match="cloud metadata"):
        await private_ok.resolve("metadata.example.com", 80, socket.AF_UNSPEC)
    listed = GuardedResolver(
        allow_private=False, allow_hosts=frozenset({"INTERNAL.example.com"}), inner=DNS
    )
    assert await listed.resolve("internal.example.com", 80, socket.AF_UNSPEC)


async def test_guarded_resolver_with_real_dns_refuses_localhost() -> None:
    guarded = GuardedResolver(allow_private=False)
    with pytest.raises(UnsafeWebhookUrlError, match="loopback"):
        await guarded.resolve("localhost", 80, socket.AF_UNSPEC)
    await guarded.close()


async def test_static_resolver_filters_by_family() -> None:
    async def hosts(family: socket.AddressFamily) -> list[str]:
        return [r["host"] for r in await DNS.resolve("hooks.example.com", 80, family)]

    assert await hosts(socket.AF_INET) == [PUBLIC_V4]
    assert await hosts(socket.AF_INET6) == [PUBLIC_V6]
    assert await hosts(socket.AF_UNSPEC) == [PUBLIC_V4, PUBLIC_V6]
