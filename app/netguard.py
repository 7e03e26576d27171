"""Which hosts the server may reach on a user's behalf (SSRF): public addresses only, unless an
operator allows a network. Outbound deliveries and repository clones both ask here. No Flask:
the worker's workspace code uses it too."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(ValueError):
    """The address is not one we connect to."""


#: IPv6 ranges that carry an IPv4 address to somewhere else (compatible, NAT64, 6to4, Teredo,
#: SIIT): `::7f00:1` or `64:ff9b::7f00:1` can reach 127.0.0.1 through a translator
TRANSITION = tuple(
    ipaddress.ip_network(n)
    for n in (
        "::/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "2002::/16",
        "2001::/32",
        "::ffff:0:0:0/96",
    )
)


def _public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            address = address.ipv4_mapped
        elif any(address in net for net in TRANSITION):
            return False
    return address.is_global and not address.is_multicast


def check_address(host: str, address: Address, allowed: Sequence[Network]) -> None:
    if _public(address) or any(address in net for net in allowed):
        return
    raise Refused(
        f"{host} is {address}, a loopback, private or reserved address; allow its network "
        "in SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS to reach it"
    )


def resolve(host: str, port: int, allowed: Sequence[Network]) -> list[Address]:
    """Every address `host` has, each checked; raises `Refused` or `OSError` (DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(
        dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
    )
    for address in addresses:
        check_address(host, address, allowed)
    return addresses


def check_host(host: str, port: int, allowed: Sequence[Network]) -> None:
    """For saving a URL: a literal address is checked; a name is checked if it resolves now
    (whoever connects later checks again)."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        check_address(host, literal, allowed)
        return
    with contextlib.suppress(OSError):  # not resolvable from here right now
        resolve(host, port, allowed)
