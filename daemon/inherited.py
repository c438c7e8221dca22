"""Socket activation in the daemon: which listener adopts which inherited socket.

systemd hands ``callboard serve`` its sockets named after the role each plays
(``FileDescriptorName=``: tftp, http, tvs, sip-udp, …; see :mod:`.systemd_fds`). The one
reader of ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` is :func:`capture`, called first
thing in ``main`` (before anything imports ``twisted.internet.endpoints``, which would clear
them); everything later works from the :class:`InheritedSockets` it returns.

The rule: when no socket is inherited the daemon binds its listeners as configured. As soon as
any is, socket activation decides: a role with sockets adopts them, a role without is off
(its ``.socket`` unit is not enabled), and a name that is no role is refused at start.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from callboard.protocols.listening import (
    Adopt,
    Family,
    Kind,
    ListenerSpec,
    resolve_inherited,
)

from . import systemd_fds
from .systemd_fds import ROLE_NAMES, SocketActivationError

__all__ = ["InheritedSockets", "SocketActivationError", "capture"]

_FAMILY_NAMES: dict[int, Family] = {2: "INET", 10: "INET6", 1: "UNIX"}


@dataclass(frozen=True)
class InheritedSockets:
    """The sockets this process inherited, by ``LISTEN_FDNAMES`` name (empty: none).

    ``error`` holds a malformed environment's one-line message until ``callboard serve``
    reports it (other commands ignore socket activation).
    """

    fds: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    error: str | None = None

    @property
    def activated(self) -> bool:
        return bool(self.fds)

    def check(self, extra_names: Collection[str] = ()) -> None:
        """Refuse a malformed environment, an unknown name or a socket of the wrong kind.

        ``extra_names`` are names an ``[endpoints]`` ``systemd:name=…`` spec adopts itself.
        """
        if self.error is not None:
            raise SocketActivationError(self.error)
        fds = {name: list(descriptors) for name, descriptors in self.fds.items()}
        systemd_fds.refuse_unknown_names(fds, ROLE_NAMES | frozenset(extra_names))
        systemd_fds.check_socket_types(fds)

    def for_role(
        self, role: str, kind: Kind, *, receive_buffer: int = 0
    ) -> list[ListenerSpec] | None:
        """The listeners for ``role``: ``None`` means bind as configured (no activation);
        an empty list means the listener is off (activation without this role's socket)."""
        if not self.activated:
            return None
        return [
            ListenerSpec(kind, Adopt(fd=fd, family=_family(fd)), receive_buffer=receive_buffer)
            for fd in self.fds.get(role, ())
        ]

    def resolve(self, spec: ListenerSpec) -> ListenerSpec:
        """An ``[endpoints]`` ``systemd:`` spec made concrete (others unchanged)."""
        return resolve_inherited(spec, self.fds)


def _family(fd: int) -> Family:
    return _FAMILY_NAMES.get(int(systemd_fds.socket_family(fd)), "INET")


def capture(environ: dict[str, str] | None = None) -> InheritedSockets:
    """Read (and remove) the socket-activation variables: the first thing ``main`` does.

    Nothing is read when none of them is set, so an in-process ``main()`` (tests) never
    trips over a Twisted module imported before it.
    """
    env = os.environ if environ is None else environ
    if not any(name in env for name in systemd_fds.LISTEN_VARIABLES):
        return InheritedSockets()
    try:
        fds = systemd_fds.read_listen_fds(environ)
    except SocketActivationError as exc:
        return InheritedSockets(error=str(exc))
    return InheritedSockets({name: tuple(descriptors) for name, descriptors in fds.items()})
