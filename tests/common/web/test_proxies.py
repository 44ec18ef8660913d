"""TrustedProxies (web/proxies.py): which peers' forwarded headers count, without a server."""

from __future__ import annotations

import re

import pytest

from demo.common.services import ConfigError
from demo.common.web.proxies import TrustedProxies
from demo.conf import settings as config
from demo.main import trusted_proxies


def test_trusted_proxies_are_addresses_and_networks():
    proxies = TrustedProxies.parse(" 10.0.0.0/8, 192.0.2.7 ,fd00::/8,")
    assert "10.1.2.3" in proxies and "192.0.2.7" in proxies and "fd00::1" in proxies
    assert "::ffff:10.1.2.3" in proxies  # an IPv4 peer on a dual-stack socket
    assert "192.0.2.8" not in proxies and "127.0.0.1" not in proxies and "0.0.0.0" not in proxies
    default = TrustedProxies.parse(config.defaults().trusted_proxies)
    assert "127.0.0.1" in default and "127.9.9.9" in default and "::1" in default and "10.0.0.1" not in default
    with pytest.raises(ConfigError, match="not-an-ip"):
        trusted_proxies(config.defaults(trusted_proxies="127.0.0.1,not-an-ip"))


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("192.168.4.0", True),  # the network's first address
        ("192.168.7.255", True),  # its last (a /22)
        ("192.168.8.0", False),  # just past it
        ("192.168.3.255", False),  # just before it
    ],
)
def test_a_cidr_network_covers_exactly_its_range(peer, trusted):
    assert (peer in TrustedProxies.parse("192.168.4.0/22")) is trusted


def test_a_network_with_host_bits_set_is_read_as_its_network():
    """``10.1.2.3/16`` (strict=False) means 10.1.0.0/16, as nginx's set_real_ip_from reads it."""
    proxies = TrustedProxies.parse("10.1.2.3/16")
    assert "10.1.200.7" in proxies and "10.2.0.1" not in proxies


def test_ipv6_peers_networks_and_scopes():
    proxies = TrustedProxies.parse("2001:db8::/32, fe80::1")
    assert "2001:db8:ffff::42" in proxies and "2001:db9::1" not in proxies
    assert "fe80::1%eth0" in proxies  # a link-local peer with its scope id
    assert "fe80::2%eth0" not in proxies
    assert "2001:0DB8:0000::1" in proxies  # another spelling of an address inside
    assert "::ffff:192.0.2.1" not in proxies  # an IPv4-mapped peer is compared as the IPv4 address


def test_an_ipv4_mapped_peer_matches_an_ipv4_entry_only():
    ipv4 = TrustedProxies.parse("192.0.2.0/24")
    assert "::ffff:192.0.2.9" in ipv4 and "::ffff:198.51.100.9" not in ipv4


@pytest.mark.parametrize("peer", ["", "unix:/run/demo.sock", "localhost", "10.0.0.300", "10.0.0.1:8000"])
def test_a_peer_that_is_not_an_ip_address_is_never_trusted(peer):
    assert peer not in TrustedProxies.parse("0.0.0.0/0, ::/0")


def test_nothing_is_trusted_when_the_list_is_empty():
    for text in ("", " , ,"):
        proxies = TrustedProxies.parse(text)
        assert proxies.networks == () and "127.0.0.1" not in proxies and "::1" not in proxies


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "nope", "10.0.0.0/8/8", "fd00::/129"])
def test_a_bad_entry_is_named(entry):
    with pytest.raises(ValueError, match=re.escape(f"trusted_proxies: {entry!r}")):
        TrustedProxies.parse(f"127.0.0.1, {entry}")


def test_the_answer_does_not_change_when_asked_again():
    """Remembered lookups (the lru cache) give the same answer as the first, for many peers."""
    proxies = TrustedProxies.parse("10.0.0.0/24")
    first = [f"10.0.{n // 256}.{n % 256}" in proxies for n in range(600)]
    again = [f"10.0.{n // 256}.{n % 256}" in proxies for n in range(600)]
    assert first == again and sum(first) == 256
