"""A resolver that answers IP addresses itself and asks the system only for names.

Tornado's default resolver hands every host, ``127.0.0.1`` and ``10.0.0.11`` included, to
``getaddrinfo`` on a thread pool. A scheduler following a thousand workers by address makes
~200 health checks and feed reconnects a second at ``health_interval`` 5 s: each one a thread
hand-off (and a GIL round trip) for an answer the address already is.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from tornado.netutil import DefaultLoopResolver, Resolver


class LiteralFirstResolver(Resolver):
    """IP literals resolved in place; names through ``fallback`` (asyncio's getaddrinfo)."""

    def initialize(self, fallback: Resolver | None = None) -> None:
        self.fallback = fallback or DefaultLoopResolver()

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        literal = literal_address(host, port, family)
        if literal is not None:
            return literal
        return await self.fallback.resolve(host, port, family)

    def close(self) -> None:
        self.fallback.close()


def literal_address(host: str, port: int, family: socket.AddressFamily) -> list[tuple[int, Any]] | None:
    """``[(family, sockaddr)]`` when ``host`` is an IP address of an allowed family, else None."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if address.version == 4 and family in (socket.AF_UNSPEC, socket.AF_INET):
        return [(socket.AF_INET, (str(address), port))]
    if address.version == 6 and family in (socket.AF_UNSPEC, socket.AF_INET6):
        return [(socket.AF_INET6, (str(address), port, 0, 0))]
    return None
