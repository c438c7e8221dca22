"""A loopback port nothing holds now, for a peer that must be told its port before it starts
(sipp's ``-p``, an SMTP stub, ``--metrics-port``...). Another process may take it between
this call and the peer's bind: use port 0 and read the bound port back wherever the peer
allows that."""

from __future__ import annotations

import socket


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 free for ``kind`` (TCP unless told) at the time of asking."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
