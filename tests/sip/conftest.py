"""Fixtures for the SIP registrar tests: an in-memory policy and REGISTER builders.

The policy here is the test double of the daemon's: devices by name with MAC, model, state and
lines (directory number → digest credentials or None).
"""

from __future__ import annotations

import datetime
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from callboard.protocols.sip.message import Response, StreamFramer, parse_message
from callboard.protocols.sip.registrar import (
    PolicyDecision,
    Registrar,
    RegistrarSettings,
    RegistrationRequest,
)
from callboard.protocols.sip.transports import SIPStreamProtocol
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

ACTIVE = "SEP001122334455"
ACTIVE_MAC = "001122334455"
INACTIVE = "SEP00AABBCCDDEE"
INACTIVE_MAC = "00aabbccddee"


@dataclass
class Device:
    name: str
    mac: str
    model_id: str
    active: bool
    lines: dict[str, tuple[str, str] | None]


@dataclass
class MemoryPolicy:
    devices: dict[str, Device] = field(default_factory=dict)
    seen: list[RegistrationRequest] = field(default_factory=list)
    allow_all: bool = False

    def decide(self, request: RegistrationRequest) -> PolicyDecision:
        self.seen.append(request)
        if self.allow_all:
            return PolicyDecision.allow(request.device_name)
        name = request.device_name
        if name is None and len(request.bound_devices) == 1:
            name = request.bound_devices[0]
        dev = self.devices.get(name or "")
        if dev is None:
            return PolicyDecision.refuse(404, f"unknown device {name}")
        if not dev.active:
            return PolicyDecision.refuse(403, "device not activated")
        if request.mac is not None and request.mac != dev.mac:
            return PolicyDecision.refuse(403, "MAC does not match the device")
        if request.model_id is not None and request.model_id != dev.model_id:
            return PolicyDecision.refuse(403, "model does not match the device")
        if request.aor_user not in dev.lines:
            return PolicyDecision.refuse(403, f"{request.aor_user} is not a line of {dev.name}")
        return PolicyDecision.allow(dev.name, dev.lines[request.aor_user])


@pytest.fixture
def policy() -> MemoryPolicy:
    return MemoryPolicy(
        {
            ACTIVE: Device(
                ACTIVE, ACTIVE_MAC, "683", True, {"1001": None, "1002": ("a1002", "pw")}
            ),
            INACTIVE: Device(INACTIVE, INACTIVE_MAC, "683", False, {"2001": None}),
        }
    )


_counter = itertools.count(1)


def build_register(
    *,
    user: str = "1001",
    host: str = "192.0.2.10",
    device: str | None = ACTIVE,
    mac: str | None = ACTIVE_MAC,
    model: str | None = "683",
    contact_user: str = "f0ae9f65-9fa6-4a32-84ba-4d40048f79c8",
    contact_host: str = "192.0.2.50:50057",
    transport: str = "UDP",
    contacts: list[str] | None = None,
    expires: int | None = 3600,
    call_id: str = "00112233-44550002-7f50d2cf@192.0.2.50",
    cseq: int = 101,
    branch: str | None = None,
    via: str | None = None,
    extra: tuple[str, ...] = (),
    max_forwards: int = 70,
    method: str = "REGISTER",
) -> bytes:
    """A Cisco-style REGISTER (section 10 of the protocol notes)."""
    if contacts is None:
        params = ""
        if mac is not None:
            params += f';+sip.instance="<urn:uuid:00000000-0000-0000-0000-{mac}>"'
        if device is not None:
            params += f';+u.sip!devicename.ccm.cisco.com="{device}"'
        if model is not None:
            params += f';+u.sip!model.ccm.cisco.com="{model}"'
        contacts = [f"<sip:{contact_user}@{contact_host};transport={transport.lower()}>{params}"]
    branch = branch or f"z9hG4bK{next(_counter):08x}{os.urandom(3).hex()}"
    lines = [
        f"{method} sip:{host} SIP/2.0",
        via or f"Via: SIP/2.0/{transport} {contact_host};branch={branch}",
        f"From: <sip:{user}@{host}>;tag=001122334455000a",
        f"To: <sip:{user}@{host}>",
        f"Call-ID: {call_id}",
        f"Max-Forwards: {max_forwards}",
        f"CSeq: {cseq} {method}",
        "User-Agent: Cisco-CP8841/12.8.1",
        *[f"Contact: {c}" for c in contacts],
        *([f"Expires: {expires}"] if expires is not None else []),
        *extra,
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def smuggling(contact_host: str = "192.0.2.50:50057") -> bytes:
    """A REGISTER declaring ``Content-Length: 0`` and then the length of a second REGISTER
    that rides in its body (it would bind the phone if it were read as a request)."""
    inner = build_register(
        transport="TCP", contact_host=contact_host, call_id="smuggled", extra=("X-Smuggled: 1",)
    )
    outer = build_register(transport="TCP", contact_host=contact_host)
    assert outer.endswith(b"Content-Length: 0\r\n\r\n")
    head = outer[: -len(b"\r\n")]
    return head.replace(
        b"Content-Length: 0\r\n", f"Content-Length: 0\r\nContent-Length: {len(inner)}\r\n".encode()
    ) + b"\r\n" + inner  # fmt: skip


@pytest.fixture
def make_register() -> Callable[..., bytes]:
    return build_register


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_registrar(policy: MemoryPolicy, clock: FakeClock) -> Callable[..., Registrar]:
    def make(**settings: Any) -> Registrar:
        return Registrar(
            policy,
            RegistrarSettings(**settings),
            now=clock,
            wall_now=lambda: 1553819486.0,
        )

    return make


def make_self_signed(cn: str) -> tuple[bytes, bytes]:
    """A throwaway EC certificate and key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@pytest.fixture(scope="session")
def server_cert() -> tuple[bytes, bytes]:
    return make_self_signed("callboard-test")


@pytest.fixture(scope="session")
def phone_cert() -> tuple[bytes, bytes]:
    return make_self_signed("CP-8841-SEP001122334455")


def open_stream(
    registrar: Registrar, clock: Any = None
) -> tuple[SIPStreamProtocol, StringTransport]:
    """A SIP stream connection from 192.0.2.50:50057 over a StringTransport (``clock``: the
    reactor its deadlines run on, if the test drives them)."""
    proto = SIPStreamProtocol(registrar, "tcp", clock)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.50", 50057))
    proto.makeConnection(transport)
    return proto, transport


def stream_responses(data: bytes) -> list[Response]:
    """The SIP responses written on a stream, parsed (each must be a response)."""
    out = []
    for raw in StreamFramer().feed(data):
        msg = parse_message(raw)
        assert isinstance(msg, Response)
        out.append(msg)
    return out
