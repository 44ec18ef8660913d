"""common/infra/ratelimit.py without HTTP: who a per-client limit counts as one client."""

from __future__ import annotations

import pytest

from demo.common.infra.ratelimit import client_key


@pytest.mark.parametrize(
    ("address", "client"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # any address of the /64, any spelling
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64 is another client
        ("::ffff:198.51.100.7", "198.51.100.7"),  # IPv4-mapped: the IPv4 client it is
        ("::1", "::/64"),
        ("", ""),  # no address (a unix socket peer): the only name there is
    ],
)
def test_client_key_is_the_ipv4_address_or_the_ipv6_64(address, client):
    assert client_key(address) == client
