"""``cluster.nodes``: read from the configuration, written into every phone config, read back
by the emulated phone, which falls over to the next call manager when one does not answer."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
import pytest_twisted
from callboard.daemon.cluster import ClusterNode
from callboard.daemon.config import ConfigError, load_config
from callboard.daemon.provisioning import ProvisioningSettings, ProvisioningTree
from callboard.daemon.registry.model import Line
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import SQLiteStore
from callboard.phone import driver
from callboard.phone.boot import Activate, BootOptions, PhoneIdentity, Register
from callboard.phone.config import TVSMember, parse_default_config, parse_device_config
from callboard.protocols.filesource import DirectorySource, Requester
from callboard.protocols.tvs import labpki
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

PHONE = Requester("127.0.0.1", 50000, "tftp")
NODES = (
    ClusterNode("pub", "192.0.2.10"),
    ClusterNode("sub1", "192.0.2.11", sip_port=5070, tvs_port=2446),
)


def test_cluster_nodes_come_from_toml_in_order(tmp_path: Path) -> None:
    path = tmp_path / "callboard.toml"
    path.write_text(
        "[cluster]\n"
        'nodes = [{name = "pub", address = "192.0.2.10"},\n'
        '         {name = "sub1", address = "192.0.2.11", sip_port = 5070, tvs_port = 2446}]\n'
    )
    assert load_config(path).cluster.nodes == NODES
    assert load_config(None).cluster.nodes == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pub", "expected a list"),
        ([{"name": "a"}], "node 0: address must be a non-empty string"),
        ([{"name": "a", "address": "192.0.2.1", "port": 1}], "unknown key 'port'"),
        ([{"name": "a", "address": "192.0.2.1", "sip_port": 70000}], "sip_port must be a port"),
        ([{"name": "a", "address": "x y"}], "is not an address or host name"),
        ([{"name": "a", "address": "192.0.2.1"}] * 2, "node name 'a' is given twice"),
        (
            [{"name": str(i), "address": f"192.0.2.{i}"} for i in range(6)],
            "at most 5 nodes",
        ),
    ],
)
def test_bad_cluster_nodes_are_refused_with_the_key(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=r"cluster\.nodes") as caught:
        load_config(None, {"cluster.nodes": value})
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest_twisted.async_yield_fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    store = SQLiteStore(tmp_path / "db.sqlite3")
    yield Registry(store, lambda: 1_800_000_000.0)
    await store.close()


def make_tree(tmp_path: Path, registry: Registry, nodes: tuple[ClusterNode, ...]) -> Any:
    root = tmp_path / "tftp"
    root.mkdir(exist_ok=True)
    settings = ProvisioningSettings(
        address="192.0.2.99", sip_port=5060, sip_tls_port=5061, tvs_port=2445, cluster_nodes=nodes
    )
    return ProvisioningTree(registry, settings, DirectorySource(str(root)))


def fetch(tree: ProvisioningTree, name: str) -> bytes:
    body = tree.open(name, PHONE)
    return body.read_at(0, body.size)


@pytest_twisted.ensureDeferred
async def test_every_config_lists_the_nodes_in_priority_order(
    tmp_path: Path, registry: Registry
) -> None:
    tree = make_tree(tmp_path, registry, NODES)
    spec = DeviceSpec(model="8841", mac="001122334455", lines=(Line("1000", "A"),))
    await registry.add_device(replace(spec, requires_activation=False))
    default = parse_default_config(fetch(tree, "XMLDefault.cnf.xml"))
    device = parse_device_config(fetch(tree, "SEP001122334455.cnf.xml"))
    for parsed in (default, device):
        managers = [
            (c.address, c.sip_port, c.secured_sip_port, c.priority) for c in parsed.call_managers
        ]
        assert managers == [("192.0.2.10", 5060, 5061, 0), ("192.0.2.11", 5070, 5061, 1)]
        assert [(m.address, m.port, m.priority) for m in parsed.tvs_members] == [
            ("192.0.2.10", 2445, 0),
            ("192.0.2.11", 2446, 1),
        ]
    assert [c.address for c in device.sip_servers] == ["192.0.2.10", "192.0.2.11"]
    root = ET.fromstring(fetch(tree, "SEP001122334455.cnf.xml"))
    names = root.findall("devicePool/callManagerGroup/members/member/callManager/name")
    assert [n.text for n in names] == ["pub", "sub1"]


@pytest_twisted.ensureDeferred
async def test_without_cluster_nodes_the_single_node_output_is_unchanged(
    tmp_path: Path, registry: Registry
) -> None:
    tree = make_tree(tmp_path, registry, ())
    text = fetch(tree, "XMLDefault.cnf.xml").decode()
    assert (
        "    <members>\n"
        '      <member priority="0">\n'
        "        <callManager>\n"
        "          <ports>\n"
        "            <ethernetPhonePort>2000</ethernetPhonePort>\n"
        "            <sipPort>5060</sipPort>\n"
        "            <securedSipPort>5061</securedSipPort>\n"
        "          </ports>\n"
        "          <processNodeName>192.0.2.99</processNodeName>\n"
        "        </callManager>\n"
        "      </member>\n"
        "    </members>\n"
    ) in text
    assert (
        '      <member priority="0"><port>2445</port><address>192.0.2.99</address></member>\n'
    ) in text
    assert "<name>" not in text and text.count("<member ") == 2


# REGISTER failover over real loopback sockets ------------------------------------------------


class _Silent(Protocol):
    """Accepts the connection and never answers (a hung node)."""


@pytest.fixture
def silent_port() -> Iterator[int]:
    port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")  # type: ignore[attr-defined]
    yield port.getHost().port
    port.stopListening()


@pytest.fixture
def refused_port() -> int:
    """A port nothing listens on (bound, never listened, closed): connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        number: int = probe.getsockname()[1]
    return number


def _identity() -> PhoneIdentity:
    lab = labpki.make_lab_ca()
    mic = labpki.issue_mic(lab, model="8841", mac="001122334455")
    return PhoneIdentity(mac="001122334455", model="8841", mic_cert=mic.cert, mic_key=mic.key)


def _config(*ports: int) -> Any:
    members = "".join(
        f'<member priority="{i}"><callManager><ports><sipPort>{p}</sipPort>'
        f"<securedSipPort>5061</securedSipPort></ports>"
        f"<processNodeName>127.0.0.1</processNodeName></callManager></member>"
        for i, p in enumerate(ports)
    )
    xml = (
        "<device><devicePool><callManagerGroup><members>"
        f"{members}</members></callManagerGroup></devicePool>"
        "<sipProfile><sipLines><line button='1'><featureID>9</featureID><name>1000</name>"
        "<authName>1000</authName><authPassword>pw</authPassword></line></sipLines></sipProfile>"
        "<transportLayerProtocol>1</transportLayerProtocol></device>"
    )
    return parse_device_config(xml.encode())


@pytest_twisted.ensureDeferred
async def test_register_skips_refused_and_silent_call_managers_within_the_timeout(
    refused_port: int, silent_port: int
) -> None:
    options = BootOptions(timeout=0.5)
    started = time.monotonic()
    result = await driver._register(
        reactor, _identity(), Register(_config(refused_port, silent_port)), options
    )
    elapsed = time.monotonic() - started
    assert not result.ok and result.status is None
    assert result.detail.startswith("no call manager answered: ")
    assert f"127.0.0.1:{refused_port}: Connection was refused" in result.detail
    assert f"127.0.0.1:{silent_port}: timed out" in result.detail or "no response" in result.detail
    assert elapsed < 5, elapsed  # each node costs at most about one timeout


@pytest_twisted.ensureDeferred
async def test_activation_skips_silent_and_refused_tvs_members_within_the_timeout(
    refused_port: int, silent_port: int
) -> None:
    members = (TVSMember("127.0.0.1", silent_port, 0), TVSMember("127.0.0.1", refused_port, 1))
    identity = replace(_identity(), code="1234567812345678")
    started = time.monotonic()
    answer = await driver._activate(
        reactor, identity, Activate(members, b"pinned"), BootOptions(timeout=1.0)
    )
    assert answer.response is None and not answer.untrusted
    assert answer.error is not None and answer.error.startswith("no TVS server answered")
    assert f"127.0.0.1:{silent_port}: " in answer.error
    assert f"127.0.0.1:{refused_port}: Connection was refused" in answer.error
    assert time.monotonic() - started < 5
