"""Signed files in the provisioning tree: cached, shared, signed off the reactor thread; and the
asynchronous open path of TFTP and HTTP that a file still being signed takes."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.daemon import certs
from callboard.daemon.provisioning import ProvisioningSettings, ProvisioningTree
from callboard.daemon.registry.model import Line
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import SQLiteStore
from callboard.daemon.signing import SgnSigner, header_name
from callboard.protocols.filesource import (
    DirectorySource,
    FileBody,
    FileNotFound,
    MemoryBody,
    Opened,
    Requester,
)
from callboard.protocols.http.resource import provisioning_site
from callboard.protocols.tftp.server import TFTPService, TFTPSettings
from callboard.protocols.tvs import sgn
from callboard.protocols.tvs.sgn import parse_sgn, verify_sgn
from support.waiting import until
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.utils import getProcessOutputAndValue

TFTP = Requester("127.0.0.1", 50000, "tftp")
HTTPS = Requester("127.0.0.1", 50000, "https")
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def server_certs(tmp_path_factory: pytest.TempPathFactory) -> certs.ServerCertificates:
    return certs.init_certs(tmp_path_factory.mktemp("certs"))


class Jobs:
    """A runner that holds jobs until released: shows sharing and what runs when."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], bytes], Deferred[bytes]]] = []
        self.ran = 0

    def __call__(self, job: Callable[[], bytes]) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.pending.append((job, d))
        return d

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for job, d in pending:
            self.ran += 1
            d.callback(job())


def signer_for(server_certs: certs.ServerCertificates, run: Jobs | None = None) -> SgnSigner:
    cert, key = server_certs.sgn_signer()
    inline = run or (lambda job: succeed(job()))
    return SgnSigner(cert, key, reactor, lambda: NOW, run=inline)


@pytest_twisted.async_yield_fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    store = SQLiteStore(tmp_path / "db.sqlite3")
    yield Registry(store, lambda: NOW)
    await store.close()


def tree_for(tmp_path: Path, registry: Registry, signer: SgnSigner) -> ProvisioningTree:
    root = tmp_path / "tftp"
    root.mkdir(exist_ok=True)
    (root / "softkeys.xml").write_bytes(b"<softKeyCfg/>\n")
    (root / "Desktops").mkdir(exist_ok=True)
    (root / "Desktops" / "List.xml").write_bytes(b"<CiscoIPPhoneImageList/>\n")
    settings = ProvisioningSettings(address="192.0.2.10", sip_port=5060, tvs_port=2445)
    return ProvisioningTree(
        registry, settings, DirectorySource(str(root)), lambda: b"ITL", signer=signer
    )


async def read(opened: Opened) -> bytes:
    body: FileBody = await opened if isinstance(opened, Deferred) else opened
    try:
        return body.read_at(0, body.size)
    finally:
        body.close()


def test_header_names_are_base_names() -> None:
    assert header_name("Desktops/320x212x12/List.xml") == "List.xml"
    assert header_name("\\SEP001122334455.cnf.xml") == "SEP001122334455.cnf.xml"


@pytest_twisted.ensureDeferred
async def test_one_signature_per_file_version_shared_by_simultaneous_requests(
    tmp_path: Path, registry: Registry, server_certs: certs.ServerCertificates
) -> None:
    jobs = Jobs()
    signer = signer_for(server_certs, jobs)
    tree = tree_for(tmp_path, registry, signer)
    first = tree.open("XMLDefault.cnf.xml.sgn", TFTP)
    second = tree.open("xmldefault.cnf.xml.sgn", TFTP)
    assert isinstance(first, Deferred) and isinstance(second, Deferred)
    assert len(jobs.pending) == 1  # the second waits for the first's signature
    jobs.release()
    one, two = await read(first), await read(second)
    assert one == two and jobs.ran == 1
    third = tree.open("XMLDefault.cnf.xml.sgn", TFTP)
    assert isinstance(third, MemoryBody)  # the hot path: cached, answered synchronously
    assert await read(third) == one
    assert (signer.counters.signed, signer.counters.cache_hits) == (1, 2)
    unsigned = await read(tree.open("XMLDefault.cnf.xml", TFTP))
    assert verify_sgn(one, server_certs.ccm_tftp.cert, filename="XMLDefault.cnf.xml.sgn") == (
        unsigned
    )


@pytest_twisted.ensureDeferred
async def test_a_changed_record_or_file_is_signed_again(
    tmp_path: Path, registry: Registry, server_certs: certs.ServerCertificates
) -> None:
    signer = signer_for(server_certs)
    tree = tree_for(tmp_path, registry, signer)
    await registry.add_device(
        DeviceSpec(model="8841", mac="001122334455", lines=(Line("1001", "A"),),
                   requires_activation=False)
    )  # fmt: skip
    name = "SEP001122334455.cnf.xml.sgn"
    before = await read(tree.open(name, TFTP))
    assert await read(tree.open(name, TFTP)) == before and signer.counters.signed == 1
    device = registry.find("SEP001122334455")
    assert device is not None
    await registry.set_requires_activation(device.name, True)
    with pytest.raises(FileNotFound):  # withheld again: no .sgn either
        tree.open(name, TFTP)
    await registry.set_requires_activation(device.name, False)
    after = await read(tree.open(name, TFTP))  # a new record version, a new versionStamp
    assert after != before and signer.counters.signed == 2
    assert parse_sgn(after).body == await read(tree.open(name[: -len(".sgn")], TFTP))

    soft = tmp_path / "tftp" / "softkeys.xml"
    old = await read(tree.open("softkeys.xml.sgn", TFTP))
    soft.write_bytes(b"<softKeyCfg><changed/></softKeyCfg>\n")
    new = await read(tree.open("softkeys.xml.sgn", TFTP))
    assert parse_sgn(old).body != parse_sgn(new).body == soft.read_bytes()
    sub = parse_sgn(await read(tree.open("Desktops/List.xml.sgn", TFTP)))
    assert sub.filename == "List.xml.sgn"  # the base name, as sgnfile names files


@pytest_twisted.ensureDeferred
async def test_https_gets_the_unsigned_sep_config_and_refusals_stay_refusals(
    tmp_path: Path, registry: Registry, server_certs: certs.ServerCertificates
) -> None:
    tree = tree_for(tmp_path, registry, signer_for(server_certs))
    await registry.add_device(
        DeviceSpec(model="8841", mac="001122334455", lines=(Line("1001", "A"),),
                   requires_activation=False)
    )  # fmt: skip
    await registry.add_device(DeviceSpec(model="8841", mac="001122334466", lines=()))
    plain = await read(tree.open("SEP001122334455.cnf.xml", TFTP))
    assert await read(tree.open("SEP001122334455.cnf.xml.sgn", HTTPS)) == plain
    signed = await read(tree.open("SEP001122334455.cnf.xml.sgn", TFTP))
    assert parse_sgn(signed).body == plain
    for name in (
        "SEP001122334466.cnf.xml.sgn",  # awaiting activation: withheld
        "SEP0011223344FF.cnf.xml.sgn",  # unknown
        "ITLFile.tlv.sgn",
        "CTLFile.tlv.sgn",
        "SEP001122334455.cnf.xml.enc.sgn",
        "SEP001122334455.cnf.xml.sgn.sgn",
        "missing.xml.sgn",
    ):
        for requester in (TFTP, HTTPS):
            with pytest.raises(FileNotFound):
                tree.open(name, requester)
    (tmp_path / "tftp" / "vendor.xml.sgn").write_bytes(b"pre-signed")
    assert await read(tree.open("vendor.xml.sgn", TFTP)) == b"pre-signed"


@pytest_twisted.ensureDeferred
async def test_the_signature_runs_in_the_pool_not_on_the_reactor_thread(
    server_certs: certs.ServerCertificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = server_certs.sgn_signer()
    signer = SgnSigner(cert, key, reactor, lambda: NOW)
    seen: list[str] = []
    real = sgn.build_signed

    def spy(*args: Any, **kwargs: Any) -> bytes:
        seen.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(sgn, "build_signed", spy)
    signer.startService()
    try:
        result = signer.sign_bytes("a.xml", b"<a/>")
        assert isinstance(result, Deferred)
        blob = await result
    finally:
        signer.stopService()
    assert seen and seen[0] != threading.main_thread().name
    assert verify_sgn(blob, cert) == b"<a/>"
    assert parse_sgn(blob).timestamp == int(NOW)


class _Recorder(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        self.got.append(datagram)


@pytest_twisted.ensureDeferred
async def test_tftp_and_http_answer_a_file_that_is_opened_later(tmp_path: Path) -> None:
    """A source answering with Deferreds: TFTP ignores repeated RRQs meanwhile, then serves
    (tftp-hpa) or refuses (error 1); HTTP answers 200 or 404 when the Deferred fires."""
    later: dict[str, Deferred[FileBody]] = {}

    class Later:
        def open(self, name: str, requester: Requester) -> Opened:
            d: Deferred[FileBody] = Deferred()
            later[f"{requester.transport}:{name}"] = d
            return d

    service = TFTPService(Later(), ["127.0.0.1"], 0, TFTPSettings(initial_timeout=0.2))
    service.startService()
    recorder = _Recorder()
    sock = reactor.listenUDP(0, recorder, interface="127.0.0.1")
    try:
        port = service.ports[0].getHost().port
        rrq = b"\x00\x01gone.xml.sgn\x00octet\x00"
        sock.write(rrq, ("127.0.0.1", port))
        sock.write(rrq, ("127.0.0.1", port))  # repeated while the first is pending
        await until(lambda: "tftp:gone.xml.sgn" in later, limit=10.0)
        assert len(later) == 1 and recorder.got == []
        later["tftp:gone.xml.sgn"].errback(FileNotFound("gone.xml.sgn"))
        await until(lambda: bool(recorder.got), limit=10.0)
        assert recorder.got[0][:4] == b"\x00\x05\x00\x01"  # ERROR 1: file not found

        fetch = getProcessOutputAndValue(
            "tftp", ["-m", "binary", "127.0.0.1", str(port), "-c", "get", "a.xml.sgn",
                     str(tmp_path / "a")],
        )  # fmt: skip
        await until(lambda: "tftp:a.xml.sgn" in later, limit=10.0)
        later["tftp:a.xml.sgn"].callback(MemoryBody(b"signed later\n"))
        await fetch
        assert (tmp_path / "a").read_bytes() == b"signed later\n"

        site = reactor.listenTCP(0, provisioning_site(Later()), interface="127.0.0.1")
        try:
            http = site.getHost().port
            ok = getProcessOutputAndValue(
                "curl", ["-s", "-w", " %{http_code}", f"http://127.0.0.1:{http}/b.xml"]
            )
            missing = getProcessOutputAndValue(
                "curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}",
                         f"http://127.0.0.1:{http}/c.xml"]
            )  # fmt: skip
            await until(lambda: "http:b.xml" in later and "http:c.xml" in later, limit=10.0)
            later["http:b.xml"].callback(MemoryBody(b"body"))
            later["http:c.xml"].errback(FileNotFound("c.xml"))
            assert (await ok)[0] == b"body 200"
            assert (await missing)[0] == b"404"
        finally:
            await site.stopListening()
    finally:
        await sock.stopListening()
        await service.stopService()
