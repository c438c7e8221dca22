"""The read-only TFTP service: thin Twisted adapters around :mod:`.codec` and :mod:`.transfer`.

Wiring (the daemon)::

    service = TFTPService(
        source,                      # a FileSource; names arrive normalised
        settings=TFTPSettings(),     # every knob, with defaults
        reactor=reactor,             # UDP, FD set and time; the global one if omitted
        listeners=[ListenerSpec.datagram("192.0.2.10", 69, receive_buffer=...)],
    )                                # one socket per address, never a wildcard; or adopted
    service.setServiceParent(parent)
    service.ports                    # the bound IListeningPorts (tests listen on port 0)

``TFTPService(source, ["192.0.2.10"], 69, settings)`` is short for one datagram spec per
address with ``settings.receive_buffer``.

Transfers answer from a small pool of ephemeral UDP ports (their TIDs, never the listening
port) bound to the address the request arrived on, so replies always come from the address
the phone asked. The pool is opened once per local address and per process (each worker of a
scaled-out daemon has its own) and shared by all transfers there: :mod:`.demux` sorts each
port's datagrams by client address and port, so no socket, epoll registration or close is
paid per transfer. It is one port, and grows (up to ``pool_size``) only for a client that
reuses its TID while its previous transfer lingers. The listener asks :mod:`.admission`
whether to serve a request (and on what terms) and opens the file; what a request's bytes
were granted (the agreed options, the encoded packets) is kept as their plan and reused for
as long as the file source hands out the same file bytes. The per-packet path is a
dictionary lookup, one state-machine call and direct ``sendto`` calls; one service-wide
``DelayedCall`` keeps every retransmit timer.
"""

from __future__ import annotations

import contextlib
import errno
import math
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from callboard.protocols.filesource import (
    AccessViolation,
    FileBody,
    FileNotFound,
    FileSource,
    HeldBody,
    MemoryBody,
    Requester,
    printable_name,
)
from callboard.protocols.listening import AtomicMultiService, ListenerService, ListenerSpec
from callboard.protocols.settings import SettingError, check_range
from callboard.protocols.tftp import admission, codec
from callboard.protocols.tftp.demux import PortTable, free_port
from callboard.protocols.tftp.transfer import NetasciiBody, Outcome, Transfer, encode_blocks
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorFDSet,
    IReactorTime,
    IReadDescriptor,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["TFTPService", "TFTPSettings"]

log = Logger(namespace="callboard.tftp")

Address = tuple[str, int]


@dataclass(frozen=True)
class TFTPSettings:
    """Every TFTP knob. Defaults suit Ethernet phones and a boot storm of a few thousand."""

    max_blksize: int = 1468  # cap on the negotiated blksize (RFC 2348 allows up to 65464)
    max_windowsize: int = 64  # cap on the negotiated windowsize (RFC 7440)
    initial_timeout: float = 1.0  # first retransmit interval unless the client negotiates one
    max_retries: int = 5  # retransmits without progress before giving up
    transfer_deadline: float = 600.0  # whole-transfer limit, seconds
    max_transfers: int = 4096  # live transfers, all clients
    max_transfers_per_client: int = 64  # live transfers per client IP address
    receive_buffer: int = 4 * 1024 * 1024  # SO_RCVBUF on each listening socket; 0: kernel's

    def __post_init__(self) -> None:
        # What the transfer machine cannot work with at all; validate() adds sane bounds.
        check_range("max_blksize", self.max_blksize, codec.MIN_BLKSIZE, codec.MAX_BLKSIZE)
        check_range("max_windowsize", self.max_windowsize, 1, 32768)
        if self.initial_timeout <= 0:
            raise SettingError("initial_timeout", "must be positive")
        if self.transfer_deadline <= 0:
            raise SettingError("transfer_deadline", "must be positive")
        if self.max_retries < 0:
            raise SettingError("max_retries", "must not be negative")
        for name in ("max_transfers", "max_transfers_per_client"):
            if getattr(self, name) < 1:
                raise SettingError(name, "must be at least 1")

    def validate(self) -> None:
        """The bounds an operator's configuration is held to (the [tftp] section)."""
        check_range("initial_timeout", self.initial_timeout, 0.05, 255)
        check_range("max_retries", self.max_retries, 1, 100)
        check_range("transfer_deadline", self.transfer_deadline, 1, 86400)
        check_range("max_transfers", self.max_transfers, 1, 1_000_000)
        check_range("max_transfers_per_client", self.max_transfers_per_client, 1, 1_000_000)
        check_range("receive_buffer", self.receive_buffer, 0, 1 << 30)


# Bodies already in memory (a rendered file, a held one): a tuple, not a union built per call.
_IN_MEMORY = (MemoryBody, HeldBody)

# Linux UDP segmentation offload (since 4.18): socket.UDP_SEGMENT from Python 3.12 on.
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000
_GSO_REFUSED = (errno.EINVAL, errno.ENOPROTOOPT, errno.EIO, errno.EOPNOTSUPP)
_gso_works = sys.platform.startswith("linux")


class _Plan(NamedTuple):
    """What every transfer asked for by the same RRQ bytes shares, while the file is the same.

    The screening of those bytes (:func:`~.admission.admit` but for the load), the options
    agreed for the file's size and its encoded DATA packets are decided by the first such
    request; a later one still asks the source for the file and the load for room, and uses
    the plan only if the source hands out the very ``data`` it was made for.
    """

    request: admission.Admitted
    settings: TFTPSettings
    data: bytes
    terms: admission.Terms
    packets: tuple[bytes, ...] | None


class TransferSocket(Protocol):
    """What the pool needs of one of its ports; tests give an in-memory one."""

    def send_all(self, datagrams: Sequence[bytes], addr: Address) -> None: ...

    def sendto(self, datagram: bytes, addr: Address, /) -> object: ...

    def close(self) -> None: ...


Receiver = Callable[[bytes, Address], None]


@implementer(IReadDescriptor)
class _PooledSocket:
    """One pooled transfer port: a bare UDP read descriptor shared by many transfers.

    Not a ``udp.Port`` (which logs when it opens and closes) and registered with the reactor
    once, when the pool opens, not per transfer. Each wake-up drains up to ``DRAIN`` queued
    datagrams and hands each, with its source, to ``receive`` (the pool's demultiplexer).
    """

    DRAIN = 64

    def __init__(self, reactor: IReactorFDSet, local: str, receive: Receiver) -> None:
        family = socket.AF_INET6 if ":" in local else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((local, 0))
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock
        self._v6 = family == socket.AF_INET6
        self._reactor = reactor
        self._receive = receive
        self.sendto = sock.sendto
        reactor.addReader(self)

    def size_receive_buffer(self, size: int) -> None:
        """SO_RCVBUF as asked (0: the kernel's); a refusal leaves the default, which works."""
        if size > 0 and self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def send_all(self, datagrams: Sequence[bytes], addr: Address) -> None:
        """Send a window: one ``sendmsg`` with UDP segmentation offload where the kernel can.

        A window is equal-sized DATA packets (the last may be shorter), which is exactly what
        Linux's UDP_SEGMENT splits a buffer into, so 16 packets cost one system call instead of
        16. Without it (another OS, an old kernel, a device that refuses) each goes alone.
        Raises :class:`OSError` for a lost send; the caller's timer retries.
        """
        global _gso_works
        if _gso_works and len(datagrams) > 1:
            size = len(datagrams[0])
            per_call = min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // size)
            if per_call > 1 and all(len(d) == size for d in datagrams[:-1]):
                ancillary = [(socket.SOL_UDP, _UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
                assert self._sock is not None
                sendmsg = self._sock.sendmsg
                start = 0
                try:
                    for start in range(0, len(datagrams), per_call):
                        chunk = datagrams[start : start + per_call]
                        sendmsg([b"".join(chunk)], ancillary, 0, addr)
                    return
                except OSError as exc:
                    if exc.errno not in _GSO_REFUSED:
                        raise
                    _gso_works = False  # never again in this process; send one by one
                    datagrams = datagrams[start:]
        send = self.sendto
        for datagram in datagrams:
            send(datagram, addr)

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        return "tftp-transfer"

    def doRead(self) -> None:
        sock = self._sock
        if sock is None:
            return
        recvfrom, receive, v6 = sock.recvfrom, self._receive, self._v6
        for _ in range(self.DRAIN):
            try:
                datagram, addr = recvfrom(65536)
            except OSError:
                return  # drained (EAGAIN), or an ICMP error surfaced: timers cope
            if v6:
                addr = (addr[0], addr[1])
            receive(datagram, addr)
            if self._sock is None:
                return  # closed by what the datagram caused (shutdown)

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._reactor.removeReader(self)
            self._sock.close()
            self._sock = None


class _PoolPort:
    """One port of a pool: its socket and the transfers it serves (the demultiplexer)."""

    __slots__ = ("_clock", "socket", "table")

    def __init__(self, clock: IReactorTime, linger: float) -> None:
        self._clock = clock
        self.table: PortTable[_PooledTransfer] = PortTable(linger)
        self.socket: TransferSocket | None = None

    def datagram_received(self, datagram: bytes, addr: Address) -> None:
        """A datagram on this port: to its transfer, or error 5 for a TID it does not serve."""
        transfer = self.table.live.get(addr)
        if transfer is not None:
            transfer.on_datagram(datagram)
            return
        answer = self.table.stray(datagram, addr, self._clock.seconds())
        if answer is not None and self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.sendto(answer, addr)


class _TransferPool:
    """The transfer ports of one local address, used round-robin: one, and up to ``size``.

    A port is a descriptor the reactor polls and drains on each wake-up, so one port that
    takes every client's ACKs costs least (fewer ready descriptors and empty reads per
    wake-up). Another is opened only when a client reuses its TID while its transfer on every
    open port is still live or lingering (see :func:`~.demux.free_port`).
    """

    def __init__(self, service: TFTPService, local: str, size: int, linger: float) -> None:
        self.ports: list[_PoolPort] = []
        self._tables: list[PortTable[_PooledTransfer]] = []
        self._next = 0
        self._service = service
        self._clock = service.clock
        self._local = local
        self._size = max(1, size)
        self._linger = linger
        self._add_port()  # OSError: the caller answers "server busy"

    def _add_port(self) -> int:
        port = _PoolPort(self._clock, self._linger)
        port.socket = self._service.open_transfer_port(self._local, port.datagram_received)
        self.ports.append(port)
        self._tables.append(port.table)
        return len(self.ports) - 1

    def pick(self, client: Address, now: float) -> _PoolPort:
        index = free_port(self._tables, self._next, client, now)
        if index is None:
            index = self._grown() if len(self.ports) < self._size else None
            if index is None:  # as many ports as allowed: share one (the TID tells apart)
                index = self._next % len(self.ports)
        self._next = index + 1
        return self.ports[index]

    def _grown(self) -> int | None:
        """Open one more port; None if the system refuses (the transfer shares a port)."""
        try:
            return self._add_port()
        except OSError:
            return None

    def close(self) -> None:
        for port in self.ports:
            if port.socket is not None:
                port.socket.close()
                port.socket = None


class _PooledTransfer(Transfer):
    """One transfer on a pooled port: the sans-I/O machine plus where its datagrams go.

    A subclass rather than a wrapper around a :class:`Transfer`: one object per transfer
    instead of two, and the per-packet path reads the machine's state without a hop. The
    machine itself stays free of I/O; the ``on_*`` methods are the adapter's: the client's
    datagrams in, the machine's datagrams out through the port's socket. Timing is the
    service's single timer (see :meth:`TFTPService._timers_due`).
    """

    __slots__ = ("_seconds", "_service", "client", "key", "name", "port")

    def __init__(
        self,
        service: TFTPService,
        key: tuple[str, str, int],
        client: Address,
        name: str,
        port: _PoolPort,
        body: FileBody,
        terms: admission.Terms,
        packets: tuple[bytes, ...] | None,
        now: float,
    ) -> None:
        settings = service.settings
        super().__init__(
            body,
            now=now,
            blksize=terms.blksize,
            windowsize=terms.windowsize,
            timeout=terms.timeout,
            fixed_timeout=terms.fixed_timeout,
            max_retries=settings.max_retries,
            deadline=settings.transfer_deadline,
            oack=terms.oack,
            packets=packets,
        )
        self._service = service
        self._seconds = service.clock.seconds
        self.key = key
        self.client = client
        self.name = name
        self.port = port

    def begin(self, now: float) -> None:
        self._emit(self.start(now))
        self._settle()

    def _emit(self, datagrams: Sequence[bytes]) -> None:
        sock = self.port.socket
        if not datagrams or sock is None:
            return
        try:
            if len(datagrams) == 1:  # lock-step: the per-packet path, one call less
                sock.sendto(datagrams[0], self.client)
            else:
                sock.send_all(datagrams, self.client)
        except OSError:
            pass  # a full buffer or an unreachable client is a lost packet: the timer retries

    def _settle(self) -> None:
        """Finish, or make sure the service's timer fires no later than this transfer's."""
        if self.outcome is not None:
            self.close()
        elif self.timer_at < self._service._timer_at:
            self._service._timer_needed(self.timer_at)

    def on_datagram(self, datagram: bytes) -> None:
        """A datagram from this transfer's client TID on its port.

        The per-packet path, so :meth:`_emit` (lock-step case) and :meth:`_settle` are
        written out here: the same calls, two Python frames fewer per ACK.
        """
        out = self.datagram_received(datagram, self._seconds())
        if out:
            sock = self.port.socket
            if len(out) == 1 and sock is not None:
                try:  # noqa: SIM105 (suppress() costs a context manager per packet)
                    sock.sendto(out[0], self.client)
                except OSError:
                    pass  # a lost packet: the timer retries
            else:
                self._emit(out)
        if self.outcome is not None:
            self.close()
        elif self.timer_at < self._service._timer_at:
            self._service._timer_needed(self.timer_at)

    def on_timer(self, now: float) -> None:
        self._emit(self.timer_fired(now))
        if self.outcome is not None:
            self.close()

    def on_rrq_repeated(self) -> None:
        self._emit(self.rrq_repeated(self._seconds()))
        self._settle()

    def close(self, reason: str | None = None) -> None:
        now = self._seconds()
        if reason is not None:
            self.abort(now, reason)
        table = self.port.table
        if table.live.get(self.client) is not self:
            return  # closed already
        table.remove(self.client, now)
        try:
            self.body.close()
        finally:
            self._service._transfer_done(self)


class _ListenProtocol(DatagramProtocol):
    """The well-known port on one address: RRQs in, refusals out, transfers started."""

    noisy = False

    def __init__(self, service: TFTPService) -> None:
        self._service = service
        self._address = ""

    def startProtocol(self) -> None:
        # Bound or adopted, the socket says which address transfers answer from.
        assert self.transport is not None
        self._address = self.transport.getHost().host

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        try:
            self._service._request(self._address, datagram, addr, self._reply)
        except Exception:
            log.failure("tftp: unexpected error handling a request from {host}", host=addr[0])
            self._reply(codec.encode_error(codec.ErrorCode.NOT_DEFINED, "internal error"), addr)

    def _reply(self, datagram: bytes, addr: Address) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(OSError):
            self.transport.getHandle().sendto(datagram, addr)  # type: ignore[attr-defined]


class TFTPService(AtomicMultiService):
    """Read-only TFTP over a :class:`FileSource`, on one listener per spec.

    Each listener is a :class:`~callboard.protocols.listening.ListenerService` child; they
    bind (or adopt) in ``startService``, all or none.
    """

    # Opens one pooled transfer port on the address requests arrived at, handing what it
    # reads to the given receiver; may raise OSError ("server busy"). Tests substitute
    # sockets that record what is sent.
    transfer_port: Callable[[IReactorFDSet, str, Receiver], TransferSocket] = _PooledSocket
    # At most this many transfer ports per local address (per process: each worker has its
    # own pool). The first opens with the first transfer there; more only for clients that
    # reuse a TID (see _TransferPool). All are kept until the service stops.
    pool_size: int = 4
    # How long a port drops stragglers of a client's finished transfer (see demux).
    linger: float = 5.0
    # Successful transfers are counted and logged as one info line per interval (a log event
    # per transfer costs as much as the transfer); refusals and failures are logged one by
    # one at info. With log_each_transfer (the daemon sets it at --log-level debug), every
    # success also gets its own line, at debug.
    summary_interval: float = 60.0
    # Files up to this size (a config, a trust list) are read whole when the transfer starts
    # and served from memory: one read instead of one per block, no descriptor kept open.
    small_file: int = 65536
    # Such a file's DATA packets are encoded once per block size (512 and up: a tiny block
    # size would make thousands of packet objects) and shared by the transfers of the same
    # bytes (a held file, a rendered config); this many kept, then all forgotten: at most
    # about 2 x 64 KiB each.
    encoded_files: int = 64
    # Plans (see _Plan) for this many distinct RRQs of at most planned_size bytes, then all
    # forgotten: each holds a reference to bytes the file source holds anyway.
    plans_kept: int = 64
    planned_size: int = 512
    log_each_transfer: bool = False
    # Told of every finished or refused request, once, at its end (metrics): the file name
    # asked for, the outcome as logged ("ok", "timeout", "client error N", "error N", ...),
    # seconds taken and bytes acknowledged. Never called per packet.
    on_transfer_end: Callable[[str, str, float, int], None] | None = None

    def __init__(
        self,
        source: FileSource,
        addresses: Sequence[str] = (),
        port: int = 69,
        settings: TFTPSettings | None = None,
        reactor: Any = None,
        *,
        listeners: Sequence[ListenerSpec] = (),
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.source = source
        self.settings = settings or TFTPSettings()
        specs = list(listeners) or [
            ListenerSpec.datagram(address, port, receive_buffer=self.settings.receive_buffer)
            for address in addresses
        ]
        if not specs:
            raise ValueError("TFTPService needs at least one listener")
        self.clock: IReactorTime = reactor
        self.descriptors: IReactorFDSet = reactor  # transfer sockets are bare read descriptors
        self._transfers: dict[tuple[str, str, int], _PooledTransfer] = {}
        self._pools: dict[str, _TransferPool] = {}
        # One timer for all transfers, due no later than the earliest transfer's timer_at.
        self._timer: IDelayedCall | None = None
        self._timer_at = math.inf
        self._summary: IDelayedCall | None = None
        self._served = self._served_bytes = 0
        self._summary_since = 0.0
        self._per_client: dict[str, int] = {}
        # Requests whose file is still being prepared (a .sgn being signed): a repeated RRQ
        # from the same TID is ignored meanwhile, and each counts against the limits.
        self._pending: set[tuple[str, str, int]] = set()
        # (id of the bytes, blksize) -> (the bytes, kept so the id stays theirs; packets)
        self._encoded: dict[tuple[int, int], tuple[bytes, tuple[bytes, ...]]] = {}
        self._plans: dict[bytes, _Plan] = {}
        for spec in specs:
            # An RRQ is small, but a stray large datagram must not be read truncated as one.
            spec = spec.with_options(max_packet_size=65536)
            listener = ListenerService("tftp", spec, _ListenProtocol(self), reactor)
            listener.setServiceParent(self)  # type: ignore[no-untyped-call]

    def open_transfer_port(self, local: str, receive: Receiver) -> TransferSocket:
        """One pooled transfer port on ``local``, its receive buffer sized like a listener's.

        One port may take every client's ACKs, so it gets the buffer the well-known port has
        (``receive_buffer``) for bursts of a boot storm.
        """
        sock = self.transfer_port(self.descriptors, local, receive)
        if isinstance(sock, _PooledSocket):
            sock.size_receive_buffer(self.settings.receive_buffer)
        return sock

    @property
    def ports(self) -> list[IListeningPort]:
        """The bound listening ports, in the order the listeners were given."""
        return [s.port for s in self if isinstance(s, ListenerService) and s.port is not None]

    @property
    def live_transfers(self) -> int:
        return len(self._transfers)

    def stopService(self) -> Any:
        for transfer in list(self._transfers.values()):
            transfer.close("shutdown")
        self._cancel_timer()
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._log_summary()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        return super().stopService()

    # -- timing: one DelayedCall for every live transfer ------------------------------------

    def _timer_needed(self, at: float) -> None:
        """Make the service's timer fire by ``at`` (a transfer's ``timer_at``).

        Transfers only ever push their own time later as they progress, so the timer is
        moved earlier here and never later: when it fires early, it finds nothing due and
        re-arms for the earliest time still wanted.
        """
        delay = max(0.0, at - self.clock.seconds())
        if self._timer is None:
            self._timer = self.clock.callLater(delay, self._timers_due)
        else:
            self._timer.reset(delay)
        self._timer_at = at

    def _timers_due(self) -> None:
        """Retransmit for every transfer whose time has come; re-arm for the next one."""
        self._timer = None
        self._timer_at = math.inf
        now = self.clock.seconds()
        due_by = now + 1e-9  # a DelayedCall may land a hair before the float it was set for
        soonest = math.inf
        for transfer in list(self._transfers.values()):
            if transfer.timer_at <= due_by:
                transfer.on_timer(now)
                if transfer.outcome is not None:
                    continue
            if transfer.timer_at < soonest:
                soonest = transfer.timer_at
        if self._transfers and soonest < self._timer_at:
            self._timer_needed(soonest)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf

    # -- the listener's work --------------------------------------------------------------

    def _request(
        self,
        local: str,
        datagram: bytes,
        addr: Address,
        reply: Callable[[bytes, Address], None],
    ) -> None:
        """A datagram on the well-known port: a repeated RRQ, a new request, or junk."""
        key = (local, addr[0], addr[1])
        live = self._transfers.get(key)
        if live is not None:
            if codec.opcode(datagram) == codec.Opcode.RRQ:
                live.on_rrq_repeated()
            return
        if key in self._pending:
            return  # the first RRQ's file is still being prepared; it will be answered
        started = time.monotonic()
        total, of_client = (
            len(self._transfers) + len(self._pending),
            self._per_client.get(addr[0], 0),
        )
        plan = self._plans.get(datagram)
        if (
            plan is not None
            and plan.settings is self.settings
            and not admission.over_limits(total, of_client, self.settings)
        ):
            verdict: admission.Admitted | admission.Refusal | None = self._open_and_start(
                key, plan.request, reply, started, datagram, plan
            )
        else:  # a request not seen yet, or one to refuse: the whole screening
            verdict = admission.admit(datagram, admission.Load(total, of_client), self.settings)
            if isinstance(verdict, admission.Admitted):
                verdict = self._open_and_start(key, verdict, reply, started, datagram, None)
        if isinstance(verdict, admission.Refusal):
            reply(verdict.packet, addr)
            self._log_refusal(addr, verdict, started)

    def _open_and_start(
        self,
        key: tuple[str, str, int],
        request: admission.Admitted,
        reply: Callable[[bytes, Address], None],
        started: float,
        datagram: bytes,
        plan: _Plan | None,
    ) -> admission.Refusal | None:
        """Open the admitted file, agree on the options, then start the transfer.

        A file the source prepares off the reactor (a Deferred) is answered when it is ready.
        With the ``plan`` of an earlier request of the same bytes, and the source handing out
        the very bytes that plan was made for, the options are not negotiated again.
        """
        _local, host, port = key
        try:
            opened = self.source.open(request.name, Requester(host, port, "tftp"))
        except (FileNotFound, AccessViolation) as exc:
            return admission.refusal_for(request.filename, exc)
        if isinstance(opened, _IN_MEMORY):  # first: the common case, and a cheaper check
            if plan is not None and opened.data is plan.data:
                return self._start(key, request.filename, opened, plan.terms, plan.packets)
        elif isinstance(opened, Deferred):
            self._pending.add(key)
            opened.addCallbacks(
                lambda body: self._opened_later(key, request, body),
                lambda failure: self._refused_later(request, failure),
            ).addCallback(self._answer_later, key, reply, started).addErrback(
                self._failed_later, key, request.filename
            )
            return None
        return self._agree_and_start(key, request, opened, datagram)

    def _opened_later(
        self, key: tuple[str, str, int], request: admission.Admitted, body: FileBody
    ) -> admission.Refusal | None:
        self._pending.discard(key)
        if not self.running:
            body.close()
            return None
        return self._agree_and_start(key, request, body)  # prepared afresh: no plan

    def _refused_later(self, request: admission.Admitted, failure: Failure) -> admission.Refusal:
        error = failure.check(FileNotFound, AccessViolation)
        if error is not None:
            exc = failure.value
            assert isinstance(exc, FileNotFound | AccessViolation)
            return admission.refusal_for(request.filename, exc)
        log.failure("tftp: file source failed for {file}", failure, file=request.filename)
        return admission.Refusal(request.filename, codec.ErrorCode.NOT_DEFINED, "internal error")

    def _answer_later(
        self,
        refusal: admission.Refusal | None,
        key: tuple[str, str, int],
        reply: Callable[[bytes, Address], None],
        started: float,
    ) -> None:
        self._pending.discard(key)
        if refusal is not None:
            addr = (key[1], key[2])
            reply(refusal.packet, addr)
            self._log_refusal(addr, refusal, started)

    def _failed_later(self, failure: Failure, key: tuple[str, str, int], filename: str) -> None:
        self._pending.discard(key)
        log.failure("tftp: could not start {file}", failure, file=printable_name(filename))

    def _agree_and_start(
        self,
        key: tuple[str, str, int],
        request: admission.Admitted,
        body: FileBody,
        datagram: bytes | None = None,
    ) -> admission.Refusal | None:
        """Negotiate, then start; remember the outcome as the plan for ``datagram``, if any."""
        terms = admission.agree(request, body.size, self.settings)
        if isinstance(terms, admission.Refusal):
            body.close()
            return terms
        in_memory = isinstance(body, _IN_MEMORY)
        if request.netascii:
            body = NetasciiBody(body)
        elif body.size <= self.small_file and not in_memory:
            whole = self._read_whole(body)
            if whole is None:
                code = codec.ErrorCode.NOT_DEFINED
                return admission.Refusal(request.filename, code, "read error")
            body = whole
        packets = self._packets_for(body, terms.blksize)
        if datagram is not None and in_memory and not request.netascii:
            self._remember_plan(datagram, request, body, terms, packets)
        return self._start(key, request.filename, body, terms, packets)

    def _remember_plan(
        self,
        datagram: bytes,
        request: admission.Admitted,
        body: FileBody,
        terms: admission.Terms,
        packets: tuple[bytes, ...] | None,
    ) -> None:
        """The plan for the next requests of these bytes, while the source serves these bytes.

        Only for a file the source holds in memory (a held file, a rendered config): its
        bytes object is the same for as long as the file is, which is what the plan checks.
        """
        if len(datagram) > self.planned_size or type(datagram) is not bytes:
            return
        assert isinstance(body, _IN_MEMORY)
        if len(self._plans) >= self.plans_kept:
            self._plans.clear()
        self._plans[datagram] = _Plan(request, self.settings, body.data, terms, packets)

    @staticmethod
    def _read_whole(body: FileBody) -> MemoryBody | None:
        """A small file in one read, its descriptor closed before the first packet is sent."""
        try:
            return MemoryBody(body.read_at(0, body.size))
        except OSError:
            return None
        finally:
            body.close()

    def _packets_for(self, body: FileBody, blksize: int) -> tuple[bytes, ...] | None:
        """A small in-memory file's DATA packets, encoded by the first transfer that needs them."""
        if (
            not isinstance(body, _IN_MEMORY)
            or body.size > self.small_file
            or blksize < codec.DEFAULT_BLKSIZE
        ):
            return None
        data = body.data
        key = (id(data), blksize)
        known = self._encoded.get(key)
        if known is not None and known[0] is data:
            return known[1]
        packets = encode_blocks(data, blksize)
        if len(self._encoded) >= self.encoded_files:
            self._encoded.clear()
        self._encoded[key] = (data, packets)
        return packets

    def _pool(self, local: str) -> _TransferPool:
        """The transfer ports of ``local``, opened with its first transfer."""
        pool = self._pools.get(local)
        if pool is None:
            pool = self._pools[local] = _TransferPool(self, local, self.pool_size, self.linger)
        return pool

    def _start(
        self,
        key: tuple[str, str, int],
        filename: str,
        body: FileBody,
        terms: admission.Terms,
        packets: tuple[bytes, ...] | None,
    ) -> admission.Refusal | None:
        """A transfer on a pooled port, counted against the limits, sending its first reply."""
        now = self.clock.seconds()
        client = (key[1], key[2])
        try:
            port = self._pool(key[0]).pick(client, now)
        except OSError:
            body.close()
            return admission.Refusal(filename, codec.ErrorCode.NOT_DEFINED, "server busy")
        transfer = _PooledTransfer(self, key, client, filename, port, body, terms, packets, now)
        port.table.add(client, transfer)
        self._transfers[key] = transfer
        host = key[1]
        self._per_client[host] = self._per_client.get(host, 0) + 1
        transfer.begin(now)
        return None

    def _log_refusal(self, addr: Address, refusal: admission.Refusal, started: float) -> None:
        if self.on_transfer_end is not None:
            self.on_transfer_end(
                refusal.filename, f"error {refusal.code}", time.monotonic() - started, 0
            )
        log.info(
            "tftp {client_host}:{client_port} {file} refused: error {error_code} ({reason})",
            client_host=addr[0],
            client_port=addr[1],
            file=printable_name(refusal.filename),
            outcome=f"error {refusal.code}",
            error_code=refusal.code,
            reason=refusal.message,
            bytes=0,
            duration=time.monotonic() - started,
            blksize=None,
            windowsize=None,
        )

    def _transfer_done(self, transfer: _PooledTransfer) -> None:
        if self._transfers.get(transfer.key) is transfer:
            del self._transfers[transfer.key]
            host = transfer.client[0]
            left = self._per_client.get(host, 1) - 1
            if left > 0:
                self._per_client[host] = left
            else:
                self._per_client.pop(host, None)
            if not self._transfers:
                self._cancel_timer()
        outcome: Outcome | None = transfer.outcome
        if outcome is None:
            return
        if self.on_transfer_end is not None:
            reason = "ok" if outcome.ok else outcome.reason
            self.on_transfer_end(transfer.name, reason, outcome.duration, outcome.bytes)
        if outcome.ok:
            self._served += 1
            self._served_bytes += outcome.bytes
            if self._summary is None:
                self._summary_since = self.clock.seconds()
                self._summary = self.clock.callLater(self.summary_interval, self._log_summary)
            if not self.log_each_transfer:
                return
        self._log_transfer(transfer, outcome)

    def _log_transfer(self, transfer: _PooledTransfer, outcome: Outcome) -> None:
        """One transfer's line: every failure at info; a success only at debug, when asked."""
        emit = log.info if not outcome.ok else log.debug
        emit(
            "tftp {client_host}:{client_port} {file} {outcome} {bytes} bytes in {duration:.3f}s",
            client_host=transfer.client[0],
            client_port=transfer.client[1],
            file=printable_name(transfer.name),
            outcome="ok" if outcome.ok else outcome.reason,
            error_code=outcome.error_code,
            bytes=outcome.bytes,
            duration=outcome.duration,
            blksize=transfer.blksize,
            windowsize=transfer.windowsize,
        )

    def _log_summary(self) -> None:
        """The successful transfers since the last summary, as one info line."""
        self._summary = None
        if not self._served:
            return
        log.info(
            "tftp: {transfers} transfers served ({bytes} bytes) in {interval:.0f}s",
            transfers=self._served,
            bytes=self._served_bytes,
            interval=self.clock.seconds() - self._summary_since,
        )
        self._served = self._served_bytes = 0
