"""Which URL sources an operator allows: host/network allow and deny lists, checked before a source is opened.

By default every host is allowed except loopback (the service's own endpoints), private networks (RFC 1918, CGNAT
100.64.0.0/10, IPv6 unique-local fc00::/7), link-local and cloud metadata addresses (``ServeSettings.deny_networks``);
``allow_hosts`` re-admits names or networks -- a camera LAN is admitted with e.g. ``serve.allow_hosts:
["192.168.1.0/24"]`` (the RTSP tests allow ``127.0.0.1`` explicitly) -- and ``only_allowed`` turns the allow list
into the only hosts accepted. A host name is checked on every address it resolves to; an IPv4-mapped IPv6 address
(``::ffff:10.0.0.1``) is checked as the IPv4 address it carries. (A name that resolves differently later -- DNS
rebinding -- is outside what a pre-open check can see; deny at the network layer too where that matters.)
"""
from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from typing import Any, Callable, Iterable

from serve.core.api import ForbiddenSourceError
from stream.errors import ConfigError, RequestError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], list[str]]  # host name -> its addresses (as text)


class InvalidSourceError(RequestError):
    """The source string itself is malformed (control characters, no host)."""

    status = 400


def parse_networks(entries: Iterable[str], field: str, names: bool) -> tuple[list[Network], set[str]]:
    """``entries`` as networks, plus the host names among them (when ``names``).

    Raises:
        ConfigError: an entry is neither a network nor (if ``names``) a host name.
    """
    nets, hosts = [], set()
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            if not names or not entry or "/" in entry or any(c.isspace() for c in entry):
                raise ConfigError(
                    f"serve.{field} entry {entry!r} is not an IP network"
                    f"{' or host name' if names else ''}. Fix: write e.g. '10.0.0.0/8' or '192.168.1.5'"
                    f"{' or cam.local' if names else ''}."
                ) from None
            hosts.add(entry.lower().rstrip("."))
    return nets, hosts


def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to (the system resolver); [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []  # unresolvable: opening it will fail with its own 4xx
    return [info[4][0].split("%")[0] for info in infos]


def _addresses(host: str, resolver: Resolver) -> list[Address]:
    try:
        found: list[Address] = [ipaddress.ip_address(host)]
    except ValueError:
        found = [ipaddress.ip_address(a) for a in resolver(host)]
    # an IPv4-mapped IPv6 address reaches the IPv4 host it carries: check that one
    return [a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else a for a in found]


def check_url_source(spec: str, settings: Any, resolver: Resolver = resolve) -> None:
    """Refuse (403) a URL source whose host the operator's allow/deny lists exclude.

    Args:
        resolver: host name -> its addresses (tests pass a stub; the default asks the system resolver).

    Raises:
        InvalidSourceError: the URL has no host (400).
        ForbiddenSourceError: the host or one of its addresses is denied, or not allowed (403).
    """
    host = (urllib.parse.urlsplit(spec).hostname or "").lower().rstrip(".")
    if not host:
        raise InvalidSourceError(f"source URL {spec!r} names no host. Fix: write e.g. rtsp://camera.local:8554/x.")
    allow_nets, allow_names = parse_networks(settings.allow_hosts, "allow_hosts", names=True)
    deny_nets, _ = parse_networks(settings.deny_networks, "deny_networks", names=False)
    if host in allow_names:
        return
    addrs = _addresses(host, resolver)
    allowed = bool(addrs) and all(any(a in n for n in allow_nets) for a in addrs)
    if allowed:
        return
    if settings.only_allowed:
        raise ForbiddenSourceError(
            f"source host {host!r} is not in serve.allow_hosts ({', '.join(settings.allow_hosts) or 'empty'}). "
            "Fix: ask the operator to add it."
        )
    for addr in addrs:
        for net in deny_nets:
            if addr in net:
                raise ForbiddenSourceError(
                    f"source host {host!r} ({addr}) is in the denied network {net} (serve.deny_networks: loopback, "
                    "private networks -- RFC 1918, CGNAT, IPv6 unique-local --, link-local and metadata addresses by "
                    "default). Fix: use another host; an operator admits a camera network with serve.allow_hosts, "
                    f"e.g. serve.allow_hosts: [\"{_suggest(addr)}\"]."
                )


def _suggest(addr: Address) -> str:
    """The network to name in the fix: the address's /24 (IPv4) or /64 (IPv6)."""
    return str(ipaddress.ip_network(f"{addr}/{24 if addr.version == 4 else 64}", strict=False))


def check_source_text(spec: str) -> None:
    """Refuse control characters (a NUL byte would reach the OS as a path or URL) with a clear 400."""
    bad = sorted({f"0x{ord(c):02x}" for c in spec if ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        raise InvalidSourceError(
            f"source contains control characters ({', '.join(bad)}). Fix: send a plain URL or file path."
        )
