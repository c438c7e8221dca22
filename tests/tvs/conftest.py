"""Session-wide TVS fixtures: lab CAs, MICs and server certificates are generated once."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from callboard.daemon import certs
from callboard.protocols.tvs.activation import (
    Answer,
    ManufacturingTrust,
    Outcome,
    Redemption,
    TVSSettings,
)
from callboard.protocols.tvs.codec import DeviceName
from callboard.protocols.tvs.server import TVSTLSFactory, make_tvs_factory
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import endpoints
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed

reactor: Any = _reactor

MODEL = "8841"
MAC = "00AABBCCDDEE"
DEVICE = DeviceName(MODEL, MAC)
GOOD_CODE = "1234567812345678"


@dataclass
class CodeState:
    code: str
    mac: str | None = None  # bound to a MAC (SEP record) ...
    model: str | None = None  # ... or to a model (BAT record)
    used: bool = False
    released: bool = False
    expired: bool = False


@dataclass
class FakeAuthority:
    """In-memory registry stand-in: single use, binding and expiry decided synchronously."""

    codes: dict[str, CodeState] = field(default_factory=dict)
    calls: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, code: str, **kw: Any) -> None:
        self.codes[code] = CodeState(code, **kw)

    def redeem(self, *, mac: str, model: str, code: str, mic_sha256: str) -> Deferred[Redemption]:
        return succeed(self._decide(mac=mac, model=model, code=code, mic_sha256=mic_sha256))

    def _decide(self, *, mac: str, model: str, code: str, mic_sha256: str) -> Redemption:
        with self.lock:
            self.calls.append({"mac": mac, "model": model, "mic": mic_sha256})
            state = self.codes.get(code)
            if state is None:
                return Redemption(False, None, "unknown code")
            if state.used:
                return Redemption(False, None, "code already used")
            if state.released:
                return Redemption(False, None, "code released")
            if state.expired:
                return Redemption(False, None, "code expired")
            if state.mac is not None and state.mac != mac:
                return Redemption(False, None, "code bound to another MAC")
            if state.model is not None and state.model != model:
                return Redemption(False, None, "code bound to another model")
            state.used = True
            return Redemption(True, f"SEP{mac}", "activated")


def settled(answer: Answer) -> Outcome:
    """The outcome of a handler answer that has already fired (the fake authority's do)."""
    if isinstance(answer, Outcome):
        return answer
    results: list[Outcome] = []
    answer.addCallback(results.append)
    assert results, "the answer is still pending"
    return results[0]


@dataclass(frozen=True)
class Pki:
    server: certs.ServerCertificates
    lab: certs.LabCA
    legacy_lab: certs.LabCA
    rogue_lab: certs.LabCA
    trust: ManufacturingTrust
    mic: certs.CertKeyPair
    rsa_mic: certs.CertKeyPair
    legacy_mic: certs.CertKeyPair
    expired_mic: certs.CertKeyPair
    rogue_mic: certs.CertKeyPair
    other_mac_mic: certs.CertKeyPair
    sha1_mic: certs.CertKeyPair
    state_dir: Path
    lab_dir: Path

    @property
    def tvs_der(self) -> bytes:
        return self.server.tvs.cert.public_bytes(serialization.Encoding.DER)


def mic_tuple(pair: certs.CertKeyPair) -> tuple[x509.Certificate, Any]:
    return (pair.cert, pair.key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    state = tmp_path_factory.mktemp("tvs-state")
    server = certs.init_certs(state)
    lab = certs.make_lab_ca("ec")
    lab_dir = tmp_path_factory.mktemp("tvs-lab")
    certs.write_lab_ca(lab_dir, lab)
    legacy = certs.make_lab_ca(
        "rsa", legacy=True, root_cn="Callboard Lab Legacy Root", ca_cn="Callboard Lab Legacy CA"
    )
    rogue = certs.make_lab_ca("ec", root_cn="Rogue Root", ca_cn="Rogue CA")
    now = dt.datetime.now(dt.UTC)
    return Pki(
        server=server,
        lab=lab,
        legacy_lab=legacy,
        rogue_lab=rogue,
        trust=ManufacturingTrust([*lab.certificates, *legacy.certificates]),
        mic=certs.issue_mic(lab, model=MODEL, mac=MAC),
        rsa_mic=certs.issue_mic(lab, model="8865NR", mac="00AABBCCDD01", key_type="rsa"),
        legacy_mic=certs.issue_mic(legacy, model="7965G", mac="00AABBCCDD02"),
        expired_mic=certs.issue_mic(
            lab, model=MODEL, mac=MAC, not_after=now - dt.timedelta(days=2)
        ),
        rogue_mic=certs.issue_mic(rogue, model=MODEL, mac=MAC),
        other_mac_mic=certs.issue_mic(lab, model=MODEL, mac="00AABBCCDDFF"),
        sha1_mic=certs.issue_mic(legacy, model=MODEL, mac=MAC, sha1=True),
        state_dir=state,
        lab_dir=lab_dir,
    )


@dataclass
class RunningServer:
    factory: TVSTLSFactory
    port: int
    authority: FakeAuthority
    listening: Any


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def start_server(pki: Pki) -> Iterator[Any]:
    """Factory fixture: start a TVS listener on 127.0.0.1:0 with given settings."""
    started: list[RunningServer] = []

    def start(
        settings: TVSSettings | None = None,
        authority: FakeAuthority | None = None,
        clock: FakeClock | None = None,
    ) -> RunningServer:
        auth = authority or FakeAuthority()
        factory = make_tvs_factory(
            pki.server.tvs.cert,
            pki.server.tvs.key,
            pki.trust,
            auth,
            pki.server.itl_records(),
            settings or TVSSettings(),
            reactor,
            clock=clock,
        )
        endpoint = endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        ports: list[Any] = []
        endpoint.listen(factory).addCallback(ports.append)  # TCP listens synchronously
        listening = ports[0]
        server = RunningServer(factory, listening.getHost().port, auth, listening)
        started.append(server)
        return server

    yield start
    for server in started:
        server.listening.stopListening()
