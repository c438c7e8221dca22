"""Rendered device configs are cached with a bound: a phone's file is not re-rendered on each
fetch of a boot storm, and 100,000 devices do not keep 100,000 rendered files in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from callboard.daemon import provisioning
from callboard.daemon.provisioning import ProvisioningSettings, ProvisioningTree
from callboard.daemon.registry.model import Line
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.protocols.filesource import DirectorySource, Requester

PHONE = Requester("127.0.0.1", 50000, "tftp")


def fetch(tree: ProvisioningTree, name: str) -> bytes:
    body = tree.open(name, PHONE)
    return body.read_at(0, body.size)


@pytest_twisted.ensureDeferred
async def test_the_config_cache_keeps_the_most_recently_served_and_renders_the_same_again(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provisioning, "CONFIG_CACHE_SIZE", 2)
    renders: list[str] = []
    tree = ProvisioningTree(
        registry,
        ProvisioningSettings(address="192.0.2.10"),
        DirectorySource(str(tmp_path)),
        trust_list=lambda: b"ITL",
    )
    render = tree.render_device

    def counting(device: object) -> bytes:
        renders.append(device.name)  # type: ignore[attr-defined]
        return render(device)  # type: ignore[arg-type]

    monkeypatch.setattr(tree, "render_device", counting)
    macs = ["0011223344A1", "0011223344A2", "0011223344A3"]
    for i, mac in enumerate(macs):
        await registry.add_device(
            DeviceSpec(model="8841", mac=mac, lines=(Line(f"10{i}"),), requires_activation=False)
        )
    first = [fetch(tree, f"SEP{mac}.cnf.xml") for mac in macs]
    assert renders == [f"SEP{mac}" for mac in macs]
    # A1 was dropped (least recently served); A3 and A2 are served from the cache.
    assert fetch(tree, f"SEP{macs[2]}.cnf.xml") == first[2]
    assert fetch(tree, f"SEP{macs[1]}.cnf.xml") == first[1]
    assert len(renders) == 3
    assert fetch(tree, f"SEP{macs[0]}.cnf.xml") == first[0]  # rendered again, same bytes
    assert renders[3:] == [f"SEP{macs[0]}"]
    # A2 was served more recently than A3: A3 is the one dropped for A1.
    assert fetch(tree, f"SEP{macs[1]}.cnf.xml") == first[1]
    assert fetch(tree, f"SEP{macs[2]}.cnf.xml") == first[2]
    assert renders[4:] == [f"SEP{macs[2]}"]
