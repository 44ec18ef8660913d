"""What the list of sessions shows of the device behind a session: its user agent, cut to a length a
row and a screen can hold, and its network, coarse enough to say "near here" without keeping where a
person was to the address."""

from __future__ import annotations

import ipaddress

USER_AGENT_LENGTH = 200  # characters kept of a User-Agent header (the column holds 255)
IPV4_PREFIX, IPV6_PREFIX = 24, 48  # a /24 is a neighbourhood of addresses; a /48 one site's prefix


def coarse_ip(address: str) -> str | None:
    """The network of ``address`` as text: ``203.0.113.7`` -> ``203.0.113.0/24``, ``2001:db8:1:2::9``
    -> ``2001:db8:1::/48`` (an IPv4-mapped IPv6 address counts as IPv4); None for what is no IP
    address (a unix socket peer)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = IPV4_PREFIX if ip.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network((ip, prefix), strict=False))


def clean_user_agent(header: str | None) -> str | None:
    """The User-Agent as shown to the user: control characters replaced, cut to USER_AGENT_LENGTH;
    None when there is none."""
    if not header:
        return None
    text = "".join(char if char.isprintable() else "?" for char in header.strip()[:USER_AGENT_LENGTH])
    return text or None
