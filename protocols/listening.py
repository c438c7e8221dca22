r"""Listener specs: where a listening socket comes from, as a value, and the one way to listen.

A :class:`ListenerSpec` describes one stream or datagram listener: either bind a new socket
(an address and port, or a UNIX path) or adopt one the process inherited (by file descriptor
number, or by systemd socket-activation index or name). Every listener in a service tree is
a :class:`ListenerService` built from one, so TFTP, SIP, HTTP, TVS and the admin socket all
bind, adopt, size their receive buffers and report where they are in the same way. Nothing
touches a socket before ``startService``.

Specs can also be written as strings (the daemon's ``[endpoints]``), in Twisted's endpoint
syntax where Twisted has one (``\`` escapes ``:`` and ``=``)::

    tcp:5060:interface=192.0.2.10:backlog=128     tcp6:5060:interface=2001\:db8\:\:10
    unix:address=/run/callboard/admin.sock:mode=600:lockfile=1
    systemd:domain=INET:index=0                   systemd:domain=INET6:name=sip
    udp:69:interface=192.0.2.10                   (datagrams)
    fd:3                                          fd:fd=3:domain=INET6
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "Adopt",
    "AtomicMultiService",
    "Bind",
    "BindUNIX",
    "Family",
    "Inherited",
    "Kind",
    "ListenerService",
    "ListenerSpec",
    "describe_port",
    "listen",
    "listeners_in",
    "parse_endpoint",
    "resolve_inherited",
]

log = Logger(namespace="callboard.listening")

Kind = Literal["stream", "datagram"]
Family = Literal["INET", "INET6", "UNIX"]
Target = IProtocolFactory | AbstractDatagramProtocol

_FAMILIES: dict[str, socket.AddressFamily] = {
    "INET": socket.AF_INET,
    "INET6": socket.AF_INET6,
    "UNIX": socket.AF_UNIX,
}
DEFAULT_BACKLOG = 50  # Twisted's own default for listenTCP / listenUNIX
DEFAULT_MAX_PACKET = 8192


@dataclass(frozen=True)
class Bind:
    """Bind a new IP socket: ``host`` is the interface address ('' = all), port 0 = any free."""

    host: str = ""
    port: int = 0

    def describe(self, kind: Kind) -> str:
        scheme = "tcp" if kind == "stream" else "udp"
        return f"{scheme}:{self.host or '*'}:{self.port}"


@dataclass(frozen=True)
class BindUNIX:
    """Bind a UNIX stream socket; ``lockfile`` lets a restart replace a stale socket file."""

    path: str
    mode: int = 0o666
    lockfile: bool = False

    def describe(self, kind: Kind) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class Adopt:
    """A socket the process inherited, already bound (and listening, for a stream).

    Named by descriptor number (``fd``: a parent process or a supervisor handed it over), or
    by systemd socket activation (``systemd_index`` into ``LISTEN_FDS``, or ``systemd_name``
    from ``LISTEN_FDNAMES``), which the daemon resolves with :func:`resolve_inherited`
    against the sockets it read from its environment at start-up.
    """

    fd: int | None = None
    family: Family = "INET"
    systemd_index: int | None = None
    systemd_name: str | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.fd, self.systemd_index, self.systemd_name) if x is not None]
        if len(given) != 1:
            raise ValueError("adopt exactly one of: fd, systemd_index, systemd_name")
        if self.family not in _FAMILIES:
            raise ValueError(f"unknown address family {self.family!r} (INET, INET6, UNIX)")
        if self.fd is not None and self.fd < 0:
            raise ValueError(f"fd {self.fd} is not a file descriptor")

    def fileno(self, inherited: Inherited | None = None) -> int:
        """The descriptor to adopt; a systemd one is looked up in ``inherited``.

        ``inherited`` maps each ``LISTEN_FDNAMES`` name to its descriptors, as the daemon read
        them from the environment at start-up (``callboard.daemon.systemd_fds``): this module
        never reads the environment itself.
        """
        if self.fd is not None:
            return self.fd
        sockets = inherited or {}
        if self.systemd_name is not None:
            named = sockets.get(self.systemd_name, ())
            if not named:
                raise self._missing(f"systemd passed no socket named {self.systemd_name!r}")
            return named[0]
        descriptors = sorted(fd for fds in sockets.values() for fd in fds)
        assert self.systemd_index is not None
        if not 0 <= self.systemd_index < len(descriptors):
            raise self._missing(
                f"systemd passed {len(descriptors)} socket(s), no index {self.systemd_index}"
            )
        return descriptors[self.systemd_index]

    def _missing(self, why: str) -> CannotListenError:
        return CannotListenError("systemd", self.systemd_name or self.systemd_index, why)

    def describe(self, kind: Kind) -> str:
        if self.fd is not None:
            return f"fd:{self.fd}"
        which = f"name={self.systemd_name}" if self.systemd_name else f"index={self.systemd_index}"
        return f"systemd:domain={self.family}:{which}"


Source = Bind | BindUNIX | Adopt

# Sockets a process inherited from systemd: ``LISTEN_FDNAMES`` name -> descriptors, in order.
Inherited = Mapping[str, Sequence[int]]


def resolve_inherited(spec: ListenerSpec, inherited: Inherited) -> ListenerSpec:
    """A ``systemd:`` spec made concrete: adopt the descriptor its index or name picks.

    Raises :class:`~twisted.internet.error.CannotListenError` when systemd passed no such
    socket. Any other spec is returned as it is.
    """
    source = spec.source
    if not isinstance(source, Adopt) or source.fd is not None:
        return spec
    return replace(spec, source=Adopt(fd=source.fileno(inherited), family=source.family))


@dataclass(frozen=True)
class ListenerSpec:
    """One listener: stream or datagram, where its socket comes from, and socket options.

    ``receive_buffer`` (SO_RCVBUF, bytes; 0 = the kernel's default) matters for datagrams,
    where a burst queues in it instead of being dropped; the kernel caps it at
    ``net.core.rmem_max``. ``backlog`` applies to streams this process binds.
    """

    kind: Kind
    source: Source
    backlog: int = DEFAULT_BACKLOG
    receive_buffer: int = 0
    max_packet_size: int = DEFAULT_MAX_PACKET  # datagrams: the largest one read

    def __post_init__(self) -> None:
        if self.kind not in ("stream", "datagram"):
            raise ValueError(f"a listener is a stream or a datagram one, not {self.kind!r}")
        if self.kind == "datagram" and isinstance(self.source, BindUNIX):
            raise ValueError("datagram listeners bind IP sockets only")
        if isinstance(self.source, Bind) and not 0 <= self.source.port <= 65535:
            raise ValueError(f"{self.source.port} is not a port number")
        if self.backlog < 1 or self.receive_buffer < 0 or self.max_packet_size < 1:
            raise ValueError("backlog, receive_buffer and max_packet_size must be positive")

    @classmethod
    def stream(
        cls, host: str, port: int, *, backlog: int = DEFAULT_BACKLOG, receive_buffer: int = 0
    ) -> ListenerSpec:
        return cls("stream", Bind(host, port), backlog=backlog, receive_buffer=receive_buffer)

    @classmethod
    def datagram(
        cls,
        host: str,
        port: int,
        *,
        receive_buffer: int = 0,
        max_packet_size: int = DEFAULT_MAX_PACKET,
    ) -> ListenerSpec:
        return cls(
            "datagram",
            Bind(host, port),
            receive_buffer=receive_buffer,
            max_packet_size=max_packet_size,
        )

    @classmethod
    def unix(
        cls, path: str, *, mode: int = 0o600, lockfile: bool = True, backlog: int = DEFAULT_BACKLOG
    ) -> ListenerSpec:
        return cls("stream", BindUNIX(path, mode, lockfile), backlog=backlog)

    @classmethod
    def adopt(
        cls,
        kind: Kind,
        fd: int,
        family: Family = "INET",
        *,
        receive_buffer: int = 0,
        max_packet_size: int = DEFAULT_MAX_PACKET,
    ) -> ListenerSpec:
        return cls(
            kind,
            Adopt(fd=fd, family=family),
            receive_buffer=receive_buffer,
            max_packet_size=max_packet_size,
        )

    def with_options(
        self, *, receive_buffer: int | None = None, max_packet_size: int | None = None
    ) -> ListenerSpec:
        """The same socket with the options a protocol needs (a spec parsed from a string)."""
        return replace(
            self,
            receive_buffer=self.receive_buffer if receive_buffer is None else receive_buffer,
            max_packet_size=self.max_packet_size if max_packet_size is None else max_packet_size,
        )

    def __str__(self) -> str:
        return self.source.describe(self.kind)


# -- endpoint strings ------------------------------------------------------------------------


def parse_endpoint(text: str, kind: Kind = "stream") -> ListenerSpec:
    """A spec from an endpoint string; :class:`ValueError` says what is wrong with it."""
    fields = _split(text)
    _, scheme = fields[0]
    args = [value for key, value in fields[1:] if key is None]
    options = {key: value for key, value in fields[1:] if key is not None}
    parsers = _STREAM_PARSERS if kind == "stream" else _DATAGRAM_PARSERS
    parser = parsers.get(scheme)
    if parser is None:
        raise ValueError(
            f"{text!r}: {scheme!r} is not a {kind} endpoint type ({', '.join(parsers)})"
        )
    try:
        return parser(kind, args, options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def _split(text: str) -> list[tuple[str | None, str]]:
    r"""``a:b=c:d\:e`` → [(None, 'a'), ('b', 'c'), (None, 'd:e')], Twisted's escaping."""
    fields: list[tuple[str | None, str]] = []
    key: str | None = None
    buf: list[str] = []
    chars = iter(text)
    for c in chars:
        if c == "\\":
            buf.append(next(chars, "\\"))
        elif c == ":":
            fields.append((key, "".join(buf)))
            key, buf = None, []
        elif c == "=" and key is None:
            key, buf = "".join(buf), []
        else:
            buf.append(c)
    fields.append((key, "".join(buf)))
    if fields[0][0] is not None or not fields[0][1]:
        raise ValueError(f"{text!r}: an endpoint starts with its type, e.g. tcp:")
    return fields


def _take(
    args: list[str], options: dict[str, str], names: tuple[str, ...], required: tuple[str, ...]
) -> dict[str, str]:
    """Positional and keyword arguments by name, as Twisted's parsers take them."""
    if len(args) > len(names):
        raise ValueError(f"too many arguments: {':'.join(args)}")
    values = dict(zip(names, args, strict=False))
    for key, value in options.items():
        if key not in names:
            raise ValueError(f"unknown option {key!r} ({', '.join(names)})")
        if key in values:
            raise ValueError(f"{key} given twice")
        values[key] = value
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"{', '.join(missing)} is needed")
    return values


def _integer(name: str, text: str, base: int = 10) -> int:
    try:
        return int(text, base)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None


def _parse_ip(kind: Kind, args: list[str], options: dict[str, str], *, six: bool) -> ListenerSpec:
    names = ("port", "interface", "backlog") if kind == "stream" else ("port", "interface")
    values = _take(args, options, names, ("port",))
    host = values.get("interface", "::" if six else "")
    if host:
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            raise ValueError(f"interface={host!r} is not an IP address") from None
        if six and version != 6:
            raise ValueError(f"interface={host!r} is not an IPv6 address")
    bind = Bind(host, _integer("port", values["port"]))
    backlog = _integer("backlog", values.get("backlog", str(DEFAULT_BACKLOG)))
    return ListenerSpec(kind, bind, backlog=backlog)


def _parse_tcp(kind: Kind, args: list[str], options: dict[str, str]) -> ListenerSpec:
    return _parse_ip(kind, args, options, six=False)


def _parse_tcp6(kind: Kind, args: list[str], options: dict[str, str]) -> ListenerSpec:
    return _parse_ip(kind, args, options, six=True)


def _parse_unix(kind: Kind, args: list[str], options: dict[str, str]) -> ListenerSpec:
    values = _take(args, options, ("address", "mode", "backlog", "lockfile"), ("address",))
    # Twisted's defaults for a unix: endpoint: mode 666, lockfile on.
    return ListenerSpec(
        "stream",
        BindUNIX(
            values["address"],
            _integer("mode", values.get("mode", "666"), 8),
            bool(_integer("lockfile", values.get("lockfile", "1"))),
        ),
        backlog=_integer("backlog", values.get("backlog", str(DEFAULT_BACKLOG))),
    )


def _parse_systemd(kind: Kind, args: list[str], options: dict[str, str]) -> ListenerSpec:
    values = _take(args, options, ("domain", "index", "name"), ("domain",))
    if ("index" in values) == ("name" in values):
        raise ValueError("give exactly one of index= and name=")
    index = values.get("index")
    adopt = Adopt(
        family=_family(values["domain"]),
        systemd_index=None if index is None else _integer("index", index),
        systemd_name=values.get("name"),
    )
    return ListenerSpec(kind, adopt)


def _parse_fd(kind: Kind, args: list[str], options: dict[str, str]) -> ListenerSpec:
    values = _take(args, options, ("fd", "domain"), ("fd",))
    family = _family(values.get("domain", "INET"))
    return ListenerSpec(kind, Adopt(fd=_integer("fd", values["fd"]), family=family))


def _family(domain: str) -> Family:
    if domain not in _FAMILIES:
        raise ValueError(f"domain={domain!r} is not one of {', '.join(_FAMILIES)}")
    return cast(Family, domain)


_Parser = Callable[[Kind, list[str], dict[str, str]], ListenerSpec]
_STREAM_PARSERS: dict[str, _Parser] = {
    "tcp": _parse_tcp,
    "tcp6": _parse_tcp6,
    "unix": _parse_unix,
    "systemd": _parse_systemd,
    "fd": _parse_fd,
}
_DATAGRAM_PARSERS: dict[str, _Parser] = {
    "udp": _parse_tcp,
    "udp6": _parse_tcp6,
    "systemd": _parse_systemd,
    "fd": _parse_fd,
}


# -- listening -------------------------------------------------------------------------------


def listen(reactor: Any, spec: ListenerSpec, target: Target) -> IListeningPort:
    """Bind or adopt the spec's socket for ``target`` (a factory, or a datagram protocol).

    Raises :class:`~twisted.internet.error.CannotListenError` when the socket cannot be had.
    """
    if spec.kind == "stream":
        if not IProtocolFactory.providedBy(target):
            raise TypeError("a stream listener needs a protocol factory")
        port = _listen_stream(reactor, spec, target)
    else:
        if not isinstance(target, AbstractDatagramProtocol):
            raise TypeError("a datagram listener needs a datagram protocol")
        port = _listen_datagram(reactor, spec, target)
    _size_receive_buffer(port, spec)
    return port


def _listen_stream(reactor: Any, spec: ListenerSpec, factory: IProtocolFactory) -> IListeningPort:
    source = spec.source
    if isinstance(source, Bind):
        port: IListeningPort = reactor.listenTCP(
            source.port, factory, backlog=spec.backlog, interface=source.host
        )
        return port
    if isinstance(source, BindUNIX):
        port = reactor.listenUNIX(
            source.path, factory, backlog=spec.backlog, mode=source.mode, wantPID=source.lockfile
        )
        return port
    family = _FAMILIES[source.family]
    adopted: IListeningPort = _adopt(
        source, lambda fd: reactor.adoptStreamPort(fd, family, factory)
    )
    return adopted


def _listen_datagram(
    reactor: Any, spec: ListenerSpec, protocol: AbstractDatagramProtocol
) -> IListeningPort:
    source = spec.source
    if isinstance(source, Bind):
        port: IListeningPort = reactor.listenUDP(
            source.port, protocol, interface=source.host, maxPacketSize=spec.max_packet_size
        )
        return port
    assert isinstance(source, Adopt)
    family = _FAMILIES[source.family]
    adopted: IListeningPort = _adopt(
        source,
        lambda fd: reactor.adoptDatagramPort(
            fd, family, protocol, maxPacketSize=spec.max_packet_size
        ),
    )
    return adopted


def _adopt(source: Adopt, adopt: Callable[[int], IListeningPort]) -> IListeningPort:
    """Hand the reactor a non-blocking, close-on-exec copy of an inherited descriptor.

    The reactor keeps its own duplicate, so the inherited descriptor stays as it was; a
    blocking socket (systemd's default) would stall the reactor in ``accept``/``recvfrom``.
    """
    fd = source.fileno()
    try:
        copy = os.dup(fd)
    except OSError as exc:
        raise CannotListenError("fd", fd, exc) from exc
    try:
        os.set_blocking(copy, False)
        os.set_inheritable(copy, False)
        return adopt(copy)
    except OSError as exc:
        raise CannotListenError("fd", fd, exc) from exc
    finally:
        os.close(copy)


def _size_receive_buffer(port: IListeningPort, spec: ListenerSpec) -> None:
    """SO_RCVBUF as asked; a refusal is logged, not fatal (the default buffer still works)."""
    if spec.receive_buffer <= 0:
        return
    handle = getattr(port, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket):
        return  # a test reactor's port: nothing to size
    try:
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, spec.receive_buffer)
    except OSError as exc:
        log.warn("receive buffer of {spec} not set: {err}", spec=str(spec), err=exc)


def describe_port(port: IListeningPort) -> str:
    """``host:port`` of an IP listener, the path of a UNIX one."""
    host: Any = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    name = getattr(host, "name", host)
    return os.fsdecode(name) if isinstance(name, bytes) else str(name)


# -- services --------------------------------------------------------------------------------


class ListenerService(Service):
    """One listener in the tree: its socket is bound (or adopted) in ``startService``.

    ``label`` says what it serves ("tftp", "sip-udp", "http", ...) for status reports.
    Starting raises :class:`~twisted.internet.error.CannotListenError` when the socket
    cannot be had, so a daemon can refuse to run half-started.
    """

    def __init__(self, label: str, spec: ListenerSpec, target: Target, reactor: Any) -> None:
        self.label = label
        self.spec = spec
        self.target = target
        self.reactor = reactor
        self.port: IListeningPort | None = None

    def spec_to_listen(self) -> ListenerSpec:
        """The spec as it stands when the listener starts (a subclass may fill in a port)."""
        return self.spec

    def startService(self) -> None:
        self.port = listen(self.reactor, self.spec_to_listen(), self.target)
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is None:
            return None
        d: Deferred[None] | None = port.stopListening()
        return d

    def where(self) -> str:
        return str(self.spec) if self.port is None else describe_port(self.port)

    def address(self) -> tuple[str, int] | None:
        """(host, port) of a bound IP listener; None before it starts or for a UNIX one."""
        if self.port is None:
            return None
        host: Any = self.port.getHost()
        return (host.host, host.port) if hasattr(host, "port") else None


class AtomicMultiService(MultiService):
    """Children start in order, all or none.

    When one cannot start (a port is taken) the ones already started stop again and the
    error propagates to whoever started the tree; stopping stops only running children.
    """

    def startService(self) -> None:
        Service.startService(self)
        started: list[Any] = []
        try:
            for child in self:
                child.startService()
                started.append(child)
        except BaseException:
            Service.stopService(self)
            _stop_all(reversed(started))
            raise

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        return _stop_all(reversed([child for child in self if child.running]))


def _stop_all(children: Iterable[Any]) -> Deferred[Any]:
    stops = [maybeDeferred(child.stopService).addErrback(_stop_failed) for child in children]
    return DeferredList(stops)


def _stop_failed(failure: Failure) -> None:
    log.failure("a service failed to stop", failure)


def listeners_in(service: Any) -> Iterator[ListenerService]:
    """Every :class:`ListenerService` in a tree, depth first, in start order."""
    if isinstance(service, ListenerService):
        yield service
    if IServiceCollection.providedBy(service):
        for child in service:
            yield from listeners_in(child)
