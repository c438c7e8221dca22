"""Client connections for many emulated phones in one reactor, without per-connection extras.

Twisted's ``connectProtocol`` defines a factory class on every call and its factories log
"Starting factory"/"Stopping factory" for each connection; ``HostnameEndpoint`` resolves even
an address in a thread. In a storm (three to five connections per phone) those were a tenth
of the load generator's CPU. :func:`connect_protocol` uses one quiet factory class and
:func:`client_endpoint` connects to an address directly (a host name still goes through
``HostnameEndpoint``).
"""

from __future__ import annotations

import ipaddress
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol

__all__ = ["client_endpoint", "connect_protocol"]

P = TypeVar("P", bound=Protocol)


class _OneConnection(Factory):
    """Hands out one protocol instance, and says nothing about starting and stopping."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.instance = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self.instance


def connect_protocol(endpoint: IStreamClientEndpoint, protocol: P) -> defer.Deferred[P]:
    """Connect ``protocol`` through ``endpoint`` (``connectProtocol``, minus its overhead)."""
    d: defer.Deferred[Any] = endpoint.connect(_OneConnection(protocol))
    return d


def client_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A direct TCP endpoint for an address; name resolution only for a host name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
