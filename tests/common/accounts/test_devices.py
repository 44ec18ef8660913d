"""demo/common/accounts/devices.py: what the list of sessions keeps of a device (no database)."""

from __future__ import annotations

import pytest

from demo.common.accounts.devices import USER_AGENT_LENGTH, clean_user_agent, coarse_ip


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("203.0.113.7", "203.0.113.0/24"),
        ("203.0.113.255", "203.0.113.0/24"),
        ("10.1.2.3", "10.1.2.0/24"),
        ("2001:db8:1:2::9", "2001:db8:1::/48"),
        ("2001:db8:abcd:ffff:1:2:3:4", "2001:db8:abcd::/48"),
        ("::ffff:198.51.100.20", "198.51.100.0/24"),  # IPv4-mapped: the IPv4 network
        ("::1", "::/48"),
        ("unix-socket-peer", None),
        ("", None),
    ],
)
def test_coarse_ip_keeps_the_network_never_the_address(address, network):
    assert coarse_ip(address) == network


@pytest.mark.parametrize(
    ("header", "shown"),
    [
        ("DemoApp/2.3 (iPhone; iOS 18.1)", "DemoApp/2.3 (iPhone; iOS 18.1)"),
        ("  Mozilla/5.0  ", "Mozilla/5.0"),
        ("bad\x00\x1bagent\n", "bad??agent"),
        ("é" * 300, "é" * USER_AGENT_LENGTH),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_clean_user_agent_cuts_and_replaces_control_characters(header, shown):
    assert clean_user_agent(header) == shown
