"""Sockets inherited from systemd (socket activation), by the role each one plays.

systemd passes listening sockets as file descriptors 3, 4, … and describes them in three
variables: ``LISTEN_PID`` (the process they are for), ``LISTEN_FDS`` (how many) and
``LISTEN_FDNAMES`` (colon-separated names, from each ``.socket`` unit's
``FileDescriptorName=``). This module turns them into ``{role: [fd, …]}``; a role may have
several sockets (one ``ListenStream=`` line per address in one unit).

**Call it before anything imports** ``twisted.internet.endpoints``: that module builds a
``ListenFDs`` from the environment when it is imported and deletes ``LISTEN_PID`` and
``LISTEN_FDS`` as it does, so a later read finds nothing. This module imports nothing from
Twisted, and :func:`read_listen_fds` refuses to read ``os.environ`` once that import has
happened, rather than silently starting with every listener off.

Roles (the ``FileDescriptorName=`` values the daemon accepts; see ``systemd/``):

=========  ========  ==============================================  ======================
role       socket    what listens there                              unit shipped
=========  ========  ==============================================  ======================
tftp       datagram  TFTP, UDP 69                                    callboard-tftp.socket
http       stream    HTTP provisioning, TCP 6970                     callboard-http.socket
https      stream    HTTPS provisioning, TCP 6971                    (none yet)
tvs        stream    TVS (TLS), TCP 2445                             callboard-tvs.socket
sip-udp    datagram  SIP over UDP, 5060                              callboard-sip-udp.socket
sip-tcp    stream    SIP over TCP, 5060                              callboard-sip-tcp.socket
sip-tls    stream    SIP over TLS, 5061                              callboard-sip-tls.socket
web        stream    the web admin console                           (none yet)
metrics    stream    Prometheus ``/metrics``                         (none yet)
=========  ========  ==============================================  ======================
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass

SD_LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SocketActivationError(Exception):
    """The inherited sockets cannot be used as described; the message is one line."""


@dataclass(frozen=True)
class Role:
    name: str
    datagram: bool
    description: str


ROLES: Mapping[str, Role] = {
    role.name: role
    for role in (
        Role("tftp", True, "TFTP (UDP 69)"),
        Role("http", False, "HTTP provisioning (TCP 6970)"),
        Role("https", False, "HTTPS provisioning (TCP 6971)"),
        Role("tvs", False, "TVS (TCP 2445)"),
        Role("sip-udp", True, "SIP over UDP (5060)"),
        Role("sip-tcp", False, "SIP over TCP (5060)"),
        Role("sip-tls", False, "SIP over TLS (TCP 5061)"),
        Role("web", False, "web admin console"),
        Role("metrics", False, "Prometheus metrics"),
    )
}
ROLE_NAMES: frozenset[str] = frozenset(ROLES)


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> dict[str, list[int]]:
    """``{name: [fd, …]}`` described by the ``LISTEN_*`` variables (pure: touches no fd).

    Empty when the variables are absent or meant for another process (``LISTEN_PID`` is
    not ``pid``), as ``sd_listen_fds()`` does. Malformed variables raise
    :class:`SocketActivationError`.
    """
    listen_pid = environ.get("LISTEN_PID", "")
    if not listen_pid:
        return {}
    if not listen_pid.isdigit():
        raise SocketActivationError(f"LISTEN_PID={listen_pid!r} is not a process id")
    if int(listen_pid) != pid:
        return {}
    raw_count = environ.get("LISTEN_FDS", "")
    if not raw_count.isdigit():
        raise SocketActivationError(f"LISTEN_FDS={raw_count!r} is not a count of descriptors")
    count = int(raw_count)
    raw_names = environ.get("LISTEN_FDNAMES")
    names = _split_names(raw_names, count)
    if len(names) != count:
        raise SocketActivationError(
            f"LISTEN_FDS={count} but LISTEN_FDNAMES has {len(names)} names ({raw_names!r})"
        )
    result: dict[str, list[int]] = {}
    for offset, name in enumerate(names):
        result.setdefault(name, []).append(SD_LISTEN_FDS_START + offset)
    return result


def _split_names(raw: str | None, count: int) -> list[str]:
    """Without ``LISTEN_FDNAMES`` systemd's own library calls every descriptor "unknown"."""
    if raw is None:
        return ["unknown"] * count
    return raw.split(":") if raw else []


def read_listen_fds(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    unset: bool = True,
) -> dict[str, list[int]]:
    """The inherited descriptors of this process, made close-on-exec.

    With ``unset`` (the default) the variables are removed afterwards, as
    ``sd_listen_fds(1)`` does, so that no child process mistakes them for its own. A
    descriptor that is not open raises :class:`SocketActivationError`.
    """
    if environ is None:
        if "twisted.internet.endpoints" in sys.modules:
            raise SocketActivationError(
                "socket activation must be read before twisted.internet.endpoints is "
                "imported (it removes LISTEN_FDS from the environment)"
            )
        environ = os.environ
    try:
        fds = parse_listen_fds(environ, os.getpid() if pid is None else pid)
    finally:
        if unset:
            for variable in LISTEN_VARIABLES:
                environ.pop(variable, None)
    for descriptors in fds.values():
        for fd in descriptors:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                raise SocketActivationError(
                    f"systemd passed descriptor {fd} (LISTEN_FDS) but it is not open"
                ) from None
    return fds


def refuse_unknown_names(fds: Mapping[str, list[int]], known: Collection[str]) -> None:
    """Every inherited socket must be named after a role we serve; else one clear error.

    A socket unit without ``FileDescriptorName=`` is named after the unit itself (for
    example ``callboard-tftp.socket``), which lands here too.
    """
    unknown = sorted(name for name in fds if name not in known)
    if unknown:
        listing = ", ".join(f"{name!r} (fd {', '.join(map(str, fds[name]))})" for name in unknown)
        raise SocketActivationError(
            f"unknown socket name {listing} from systemd: set FileDescriptorName= in the "
            f".socket unit to one of {', '.join(sorted(known))}"
        )


def check_socket_types(fds: Mapping[str, list[int]], roles: Mapping[str, Role] = ROLES) -> None:
    """Each descriptor must be a socket of its role's kind (datagram for TFTP and SIP/UDP)."""
    for name, descriptors in fds.items():
        role = roles.get(name)
        if role is None:
            continue
        wanted = socket.SOCK_DGRAM if role.datagram else socket.SOCK_STREAM
        for fd in descriptors:
            kind = _socket_type(fd)
            if kind is None:
                raise SocketActivationError(f"fd {fd} named {name!r} is not a socket")
            if kind != wanted:
                unit_line = "ListenDatagram=" if role.datagram else "ListenStream="
                raise SocketActivationError(
                    f"fd {fd} named {name!r} is a {_KIND_NAMES.get(kind, str(kind))} socket; "
                    f"{role.description} needs {unit_line} in its .socket unit"
                )


_KIND_NAMES: dict[int, str] = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram"}


def _socket_type(fd: int) -> int | None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
    finally:
        sock.detach()


def inherited_sockets(
    known: Collection[str] = ROLE_NAMES,
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
) -> dict[str, list[int]]:
    """Read, name-check and type-check the inherited sockets: the one call at start-up.

    A role with no socket simply has no key (its ``.socket`` unit is not enabled: that
    listener is off).
    """
    fds = read_listen_fds(environ, pid=pid)
    refuse_unknown_names(fds, known)
    check_socket_types(fds)
    return fds


def socket_family(fd: int) -> socket.AddressFamily:
    """The address family of an inherited socket (``adoptDatagramPort`` needs it)."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.family
    finally:
        sock.detach()
