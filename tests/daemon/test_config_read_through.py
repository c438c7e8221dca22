"""Workers and nodes share one registry: a config asked of one a moment after the phone was
activated through another is served at once, not "not found" until the next feed poll."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from callboard.daemon.provisioning import ProvisioningSettings, ProvisioningTree
from callboard.daemon.registry.model import Line
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import SQLiteStore
from callboard.protocols.filesource import DirectorySource, FileNotFound, Requester
from twisted.internet import defer, reactor

PHONE = Requester("127.0.0.1", 50000, "http")
NOW = 1_800_000_000.0


@pytest_twisted.ensureDeferred
async def test_a_shared_view_reads_the_feed_before_a_config_is_not_found(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    stores = [SQLiteStore(path), SQLiteStore(path)]
    try:
        writer, view = Registry(stores[0], lambda: NOW), Registry(stores[1], lambda: NOW)
        tree = ProvisioningTree(
            view, ProvisioningSettings(address="192.0.2.10"), DirectorySource(str(tmp_path))
        )
        await writer.add_device(
            DeviceSpec(model="8841", mac="001122334455", lines=(Line("1001"),),
                       requires_activation=False)
        )  # fmt: skip
        with pytest.raises(FileNotFound):  # not shared: refused from this view at once
            tree.open("SEP001122334455.cnf.xml", PHONE)
        view.shared = True
        opened = tree.open("SEP001122334455.cnf.xml", PHONE)
        assert isinstance(opened, defer.Deferred)
        body = await opened.addTimeout(10, reactor)
        assert b"<name>1001</name>" in body.read_at(0, body.size)
        missing = tree.open("SEP0011223344FF.cnf.xml", PHONE)
        assert isinstance(missing, defer.Deferred)
        with pytest.raises(FileNotFound):  # still not found after the read
            await missing.addTimeout(10, reactor)
        with pytest.raises(FileNotFound):  # other files: no read, refused at once
            tree.open("nothing-here.bin", PHONE)
    finally:
        for store in stores:
            await store.close()
