"""Which transfer a datagram on a pooled transfer port belongs to: pure bookkeeping, no I/O.

RFC 1350 names each end of a transfer by its UDP port (its TID). A server that opens a socket
per transfer lets the kernel do this sorting, at the price of a socket, an epoll registration
and a close per transfer. Callboard instead answers from a small pool of ports per local
address and sorts datagrams itself: a transfer is (pooled port, client address and port), so
one port serves many clients at once and one client may run several transfers from different
ports. Each port keeps its own :class:`PortTable`; a datagram from a client TID that port does
not serve is answered with error 5 ("unknown transfer ID") and disturbs nothing, exactly as a
socket per transfer would.

A client that has just finished on a port may still send a late duplicate of its last ACK
there; such datagrams are dropped quietly for ``linger`` seconds (a closed per-transfer socket
would have dropped them too), and :func:`free_port` puts a client's next transfer on another
port while its previous one lingers (the pool opens one if it may), so a late packet of the
old transfer can never be taken for one of the new.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

from callboard.protocols.tftp import codec

__all__ = ["UNKNOWN_TID", "PortTable", "free_port", "pick_port"]

Address = tuple[str, int]
T = TypeVar("T")

UNKNOWN_TID = codec.encode_error(codec.ErrorCode.UNKNOWN_TID, "unknown transfer ID")
_ERROR = int(codec.Opcode.ERROR)


class PortTable(Generic[T]):
    """The live transfers of one pooled port, keyed by the client's TID (address, port)."""

    __slots__ = ("_expiry", "_prune_at", "_recent", "linger", "live")

    def __init__(self, linger: float = 5.0) -> None:
        self.live: dict[Address, T] = {}
        self.linger = linger
        # Clients whose transfer on this port ended, with when to forget them, and the same
        # in expiry order (same linger for all) so that pruning pops from the front only. A
        # queue rather than the dict's own order: taking the first key of a dict whose front
        # was deleted scans the holes, which made pruning quadratic under load.
        self._recent: dict[Address, float] = {}
        self._expiry: deque[tuple[float, Address]] = deque()
        self._prune_at = 0.0

    def add(self, client: Address, transfer: T) -> None:
        self.live[client] = transfer
        self._recent.pop(client, None)

    def remove(self, client: Address, now: float) -> None:
        """The transfer with ``client`` ended: forget it, but recognise its stragglers."""
        if self.live.pop(client, None) is None:
            return
        until = now + self.linger
        self._recent[client] = until
        self._expiry.append((until, client))
        if now >= self._prune_at:  # at most once a second: the memory is bounded all the same
            self._prune_at = now + 1.0
            self._prune(now)

    def lingering(self, client: Address, now: float) -> bool:
        """Did ``client`` finish a transfer here less than ``linger`` seconds ago?"""
        until = self._recent.get(client)
        return until is not None and until > now

    def stray(self, datagram: bytes, client: Address, now: float) -> bytes | None:
        """The answer to a datagram from a TID this port does not serve, if any.

        Error 5, except to an ERROR (never answer an error with an error) and to a client
        whose transfer here has just ended (its late duplicates are dropped).
        """
        if len(datagram) >= 2 and datagram[0] == 0 and datagram[1] == _ERROR:
            return None
        if self.lingering(client, now):
            return None
        return UNKNOWN_TID

    def _prune(self, now: float) -> None:
        recent, expiry = self._recent, self._expiry
        while expiry and expiry[0][0] <= now:
            until, client = expiry.popleft()
            if recent.get(client) == until:  # not re-inserted (or cleared) since
                del recent[client]

    def __len__(self) -> int:
        return len(self.live)


def free_port(
    tables: Sequence[PortTable[T]], start: int, client: Address, now: float
) -> int | None:
    """The index of a port where ``client`` is neither live nor lingering, or None.

    Round-robin from ``start``. None tells the pool to open another port if it may: a client
    that reuses its TID for the next transfer (tftp-hpa does, in one session) gets a port its
    previous transfer's late packets cannot reach.
    """
    count = len(tables)
    for step in range(count):
        index = (start + step) % count
        table = tables[index]
        if client not in table.live and not table.lingering(client, now):
            return index
    return None


def pick_port(tables: Sequence[PortTable[T]], start: int, client: Address, now: float) -> int:
    """The index of the port a new transfer from ``client`` should use among ``tables``.

    :func:`free_port`; if every port has the client TID (a pool of one), ``start`` itself.
    """
    index = free_port(tables, start, client, now)
    return start % len(tables) if index is None else index
