"""Which peers may tell us the client's address and scheme (X-Real-IP, X-Forwarded-*): nginx's
``set_real_ip_from``. Anyone else could claim any address (and dodge per-IP limits) or claim HTTPS."""

from __future__ import annotations

import functools
import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """A set of addresses and networks; ``ip in proxies`` says whether a peer's headers count."""

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self.networks = networks
        # Asked on every request, nearly always for the same few peers (nginx's address): remembered.
        self._contains = functools.lru_cache(maxsize=1024)(self._lookup)

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """From a comma list of addresses and CIDR networks; ValueError names a bad entry."""
        networks = []
        for entry in filter(None, (part.strip() for part in text.split(","))):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or network") from None
        return cls(tuple(networks))

    def __contains__(self, ip: str) -> bool:
        return self._contains(ip)

    def _lookup(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip.partition("%")[0])  # an IPv6 scope (fe80::1%eth0) aside
        except ValueError:
            return False  # not an IP peer (a Unix socket): never a proxy we know
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
        return any(address in network for network in self.networks)
