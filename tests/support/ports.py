"""A loopback port nothing holds now, for a peer that must be told its port before it starts
(sipp's ``-p``, an SMTP stub, ``--metrics-port``...). Another process may take it between
this call and the peer's bind: use port 0 and read the bound port back wherever the peer
allows that."""

from __future__ import annotations

import random
import socket


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 free for ``kind`` (TCP unless told) at the time of asking."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_listen_port(span: int = 1) -> int:
    """A port P below the kernel's ephemeral range where P..P+span-1 are each free for both
    UDP and TCP on 127.0.0.1 at the time of asking: for a peer that binds one number for
    several transports (baresip: SIP over UDP and TCP on P, TLS on P+1).

    Below the ephemeral range, no connection the kernel numbers itself (any process's
    outgoing TCP, a bind to port 0) can take it in the meantime; :func:`free_port`'s
    numbers come from that range and are checked for one transport only.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10_000, low - span)
        if all(_bindable(port + i, kind) for i in range(span) for kind in _BOTH):
            return port
    raise RuntimeError(f"no run of {span} free UDP+TCP port(s) below {low}")


_BOTH = (socket.SOCK_DGRAM, socket.SOCK_STREAM)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
