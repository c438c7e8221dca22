"""[cluster]: the nodes phones are told about, in priority order.

CUCM's activation-code guide warns that onboarding stops when the only node of a phone's
group is down. With ``cluster.nodes`` every ``XMLDefault.cnf.xml`` and ``SEP<MAC>.cnf.xml``
lists each node as a ``callManagerGroup`` member and a TVS member (priority 0, 1, ... in the
order given), so a phone that cannot reach the first node activates and registers at the
next. Every node renders the same list, whichever node serves the file.

Nodes of one cluster share the registry (PostgreSQL) and the identity (``callboard certs
export`` / ``certs import``); ports default to this node's advertised ones, the usual case
of nodes that differ only by address.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from callboard.protocols.settings import SettingError

__all__ = ["MAX_NODES", "ClusterNode", "ClusterSettings", "parse_nodes"]

MAX_NODES = 5  # a phone reads up to five callManagerGroup and TVS members
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-:]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class ClusterNode:
    """One node: its name, the address phones use, and ports where they differ (0: ours)."""

    name: str
    address: str
    sip_port: int = 0
    sip_tls_port: int = 0
    tvs_port: int = 0


def parse_nodes(value: Any) -> tuple[ClusterNode, ...]:
    """``[{name = "a", address = "192.0.2.10"}, ...]`` (TOML) as nodes; ValueError says why."""
    if not isinstance(value, list | tuple):
        raise ValueError(f'expected a list of {{name = "...", address = "..."}}, got {value!r}')
    return tuple(_node(i, item) for i, item in enumerate(value))


def _node(index: int, item: Any) -> ClusterNode:
    if isinstance(item, ClusterNode):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"node {index}: expected a table with name and address, got {item!r}")
    known = {f.name for f in fields(ClusterNode)}
    unknown = sorted(set(item) - known)
    if unknown:
        raise ValueError(f"node {index}: unknown key {unknown[0]!r}")
    for key in ("name", "address"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise ValueError(f"node {index}: {key} must be a non-empty string")
    for key in ("sip_port", "sip_tls_port", "tvs_port"):
        port = item.get(key, 0)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"node {index}: {key} must be a port number, got {port!r}")
    return ClusterNode(**item)


@dataclass(frozen=True)
class ClusterSettings:
    """[cluster]: ``nodes`` in priority order; empty (the default): configs name this node."""

    nodes: tuple[ClusterNode, ...] = ()

    def validate(self) -> None:
        if len(self.nodes) > MAX_NODES:
            raise SettingError("nodes", f"at most {MAX_NODES} nodes (phones read no more)")
        names: set[str] = set()
        places: set[tuple[str, int, int]] = set()
        for node in self.nodes:
            if not _HOST.match(node.address):
                raise SettingError("nodes", f"{node.address!r} is not an address or host name")
            if node.name in names:
                raise SettingError("nodes", f"node name {node.name!r} is given twice")
            place = (node.address.lower(), node.sip_port, node.tvs_port)
            if place in places:
                raise SettingError("nodes", f"node {node.name!r} repeats another node's address")
            names.add(node.name)
            places.add(place)
