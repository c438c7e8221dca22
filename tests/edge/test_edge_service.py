"""The edge in-process (the real service tree on loopback sockets, a clock the test moves):
curl with lab MICs as the phone, SIP over TLS with Python's ssl, tokens checked with PyJWT."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
import pytest_twisted
import structlog
from callboard.daemon import certs
from callboard.daemon.config import load_config
from callboard.daemon.edge.settings import RemoteSettings
from callboard.daemon.registry.model import Line, Onboarding
from callboard.daemon.registry.registry import DeviceSpec
from callboard.daemon.service import CallboardService
from callboard.protocols.oauth import x5t_s256
from callboard.protocols.tvs.sgn import parse_sgn
from cryptography.hazmat.primitives import serialization
from support.edge import activate, curl, get_config, sip_register, token_request
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

T = TypeVar("T")
Mic = tuple[Path, Path]
MAC_A, MAC_B, MAC_C = "00AABBCCDD01", "00AABBCCDD02", "00AABBCCDD03"


class Clock:
    """Wall-clock seconds plus an offset the test moves (code and token expiry)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("edge-lab")
    trusted = certs.make_lab_ca()
    certs.write_lab_ca(base / "trust", trusted)
    stranger = certs.make_lab_ca(root_cn="Stranger Root", ca_cn="Stranger CA")

    def mic(label: str, ca: certs.LabCA, model: str, mac: str) -> Mic:
        return certs.write_mic(base / label, certs.issue_mic(ca, model=model, mac=mac))

    return {
        "trust": base / "trust",
        "a": mic("a", trusted, "8841", MAC_A),
        "b": mic("b", trusted, "8841", MAC_B),
        "c_8865": mic("c", trusted, "8865", MAC_C),
        "stranger": mic("stranger", stranger, "8841", MAC_A),
        "stranger_c": mic("stranger-c", stranger, "8865", MAC_C),
    }


class Edge:
    def __init__(self, service: CallboardService, clock: Clock) -> None:
        self.service = service
        self.clock = clock

    def port(self, label: str) -> int:
        for listener in self.service.listeners:
            address = listener.address()
            if listener.label == label and address is not None:
                return address[1]
        raise AssertionError(label)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port('edge')}"

    async def device(self, *, allow_remote: bool = True, mac: str | None = None) -> tuple[str, str]:
        """A device needing a code, with line 1000: (name, code digits)."""
        registry = self.service.registry
        device = await registry.add_device(
            DeviceSpec(
                model="8841",
                mac=mac,
                lines=(Line("1000"),),
                requires_activation=True,
                allow_remote=allow_remote,
            )
        )
        code = registry.current_code(device)
        assert code is not None
        return device.name, code.code


async def in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    d = deferToThread(call, *args, **kwargs)
    d.addTimeout(60, reactor)
    return await d


@pytest_twisted.async_yield_fixture
async def edge(tmp_path: Path, lab: dict[str, Any]) -> AsyncIterator[Edge]:
    ports = ("tftp", "http", "https", "tvs", "sip", "sip_tls")  # https 0: off
    config = load_config(
        None,
        {
            "state_dir": str(tmp_path / "state"),
            "network.listen_addresses": ["127.0.0.1"],
            **{f"network.{name}_port": 0 for name in ports},
            "edge.port": 0,
            "edge.sip_oauth_port": 0,
            "edge.access_token_ttl": 600,
            "tvs.manufacturing_trust": str(lab["trust"]),
            "tvs.failure_budget": 3,
            "tvs.failure_budget_per_source": 50,  # every test phone shares 127.0.0.1
        },
    )
    service = CallboardService(config, reactor)
    clock = Clock()
    service.now = clock
    service.startService()
    try:
        yield Edge(service, clock)
    finally:
        await service.stopService()


def decode(token: str, edge: Edge, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    """PyJWT, independently: the key from the published JWKS, every standard claim checked."""
    key = jwt.PyJWK(jwks["keys"][0]).key
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["ES256"], audience=audience, issuer=edge.base
    )
    return claims


def thumbprint(mic: Mic) -> str:
    cert = certs.load_certificate(mic[0])
    return x5t_s256(cert.public_bytes(serialization.Encoding.DER))


@pytest_twisted.ensureDeferred
async def test_first_use_gives_bound_tokens_then_config_refresh_and_revocation(
    edge: Edge, lab: dict[str, Any]
) -> None:
    name, code = await edge.device()
    meta = (await in_thread(curl, f"{edge.base}/.well-known/oauth-authorization-server")).json()
    assert meta["issuer"] == edge.base and meta["token_endpoint"] == f"{edge.base}/oauth/token"
    assert meta["token_endpoint_auth_methods_supported"] == ["tls_client_auth"]

    first = await in_thread(activate, edge.base, lab["a"], code)
    assert first.status == 200, first.body
    assert first.headers["cache-control"] == "no-store"
    answer = first.json()
    assert answer["token_type"] == "Bearer" and answer["device_name"] == f"SEP{MAC_A}"
    assert answer["config_url"] == f"{edge.base}/config/SEP{MAC_A}.cnf.xml"
    assert answer["sip_uri"].startswith("sip:1000@127.0.0.1")
    assert edge.service.registry.get(f"SEP{MAC_A}").state.value == "active"
    assert edge.service.registry.find(name) is None  # the BAT record became SEP<MAC>

    jwks = (await in_thread(curl, f"{edge.base}/.well-known/jwks.json")).json()
    access = decode(answer["access_token"], edge, jwks, edge.base)
    assert jwt.get_unverified_header(answer["access_token"])["typ"] == "at+jwt"
    assert access["sub"] == access["client_id"] == f"SEP{MAC_A}"
    assert access["cnf"] == {"x5t#S256": thumbprint(lab["a"])}
    assert access["exp"] - access["iat"] == 600 == answer["expires_in"]
    refresh = decode(answer["refresh_token"], edge, jwks, f"{edge.base}/oauth/token")
    assert refresh["cnf"] == access["cnf"]

    # Single use.
    again = await in_thread(activate, edge.base, lab["a"], code)
    assert (again.status, again.json()["error"]) == (400, "invalid_grant")

    # The config through the edge: this device's, with the edge's SIP over TLS.
    token = answer["access_token"]
    conf = await in_thread(get_config, edge.base, f"SEP{MAC_A}.cnf.xml", lab["a"], token)
    assert conf.status == 200
    sip_port = edge.port("sip-oauth")
    assert f"<sipPort>{sip_port}</sipPort>".encode() in conf.body
    assert b"<transportLayerProtocol>3</transportLayerProtocol>" in conf.body
    assert b"<deviceSecurityMode>3</deviceSecurityMode>" in conf.body
    signed = await in_thread(get_config, edge.base, f"SEP{MAC_A}.cnf.xml.sgn", lab["a"], token)
    assert signed.status == 200 and parse_sgn(signed.body).body == conf.body
    itl = await in_thread(get_config, edge.base, f"ITLSEP{MAC_A}.tlv", lab["a"], token)
    assert itl.status == 200 and itl.body
    other = await in_thread(get_config, edge.base, f"SEP{MAC_B}.cnf.xml", lab["a"], token)
    assert other.status == 404

    # No token from a MIC pinned to no device, another certificate, another device's
    # token: 401 each. (No token from the MIC pinned at activation is the stock phones'
    # path, docs/REMOTE.md section 9: the same config.)
    none = await in_thread(get_config, edge.base, f"SEP{MAC_A}.cnf.xml", lab["b"], None)
    assert none.status == 401 and none.headers["www-authenticate"].startswith("Bearer realm=")
    pinned = await in_thread(get_config, edge.base, f"SEP{MAC_A}.cnf.xml", lab["a"], None)
    assert pinned.status == 200 and pinned.body == conf.body
    stolen = await in_thread(get_config, edge.base, f"SEP{MAC_A}.cnf.xml", lab["b"], token)
    assert stolen.status == 401 and 'error="invalid_token"' in stolen.headers["www-authenticate"]
    _, code_b = await edge.device()
    token_b = (await in_thread(activate, edge.base, lab["b"], code_b)).json()["access_token"]
    crossed = await in_thread(get_config, edge.base, f"SEP{MAC_A}.cnf.xml", lab["a"], token_b)
    assert crossed.status == 401 and "invalid_token" in crossed.headers["www-authenticate"]

    # Refresh: the same certificate only, and the refresh token rotates.
    old_refresh = answer["refresh_token"]
    wrong_cert = await in_thread(
        token_request, edge.base, lab["b"], grant_type="refresh_token", refresh_token=old_refresh
    )
    assert wrong_cert.json()["error"] == "invalid_grant"
    renewed = await in_thread(
        token_request, edge.base, lab["a"], grant_type="refresh_token", refresh_token=old_refresh
    )
    assert renewed.status == 200, renewed.body
    fresh = renewed.json()
    assert fresh["refresh_token"] != old_refresh
    replay = await in_thread(
        token_request, edge.base, lab["a"], grant_type="refresh_token", refresh_token=old_refresh
    )
    assert (replay.status, replay.json()["error"]) == (400, "invalid_grant")
    conf = await in_thread(
        get_config, edge.base, f"SEP{MAC_A}.cnf.xml", lab["a"], fresh["access_token"]
    )
    assert conf.status == 200

    # Revocation: every token of the device fails at once.
    await edge.service.registry.revoke_tokens(f"SEP{MAC_A}")
    for access_token in (token, fresh["access_token"]):
        revoked = await in_thread(
            get_config, edge.base, f"SEP{MAC_A}.cnf.xml", lab["a"], access_token
        )
        assert revoked.status == 401
    refused = await in_thread(
        token_request,
        edge.base,
        lab["a"],
        grant_type="refresh_token",
        refresh_token=fresh["refresh_token"],
    )
    assert refused.json()["error"] == "invalid_grant"
    # Device B is untouched.
    still = await in_thread(get_config, edge.base, f"SEP{MAC_B}.cnf.xml", lab["b"], token_b)
    assert still.status == 200


@pytest_twisted.ensureDeferred
async def test_refusals_name_no_detail_to_the_client(edge: Edge, lab: dict[str, Any]) -> None:
    _, code = await edge.device()
    with structlog.testing.capture_logs() as logs:
        bare = await in_thread(activate, edge.base, None, code)
        assert (bare.status, bare.json()["error"]) == (401, "invalid_client")
        stranger = await in_thread(activate, edge.base, lab["stranger"], code)
        assert (stranger.status, stranger.json()["error"]) == (401, "invalid_client")
        wrong_model = await in_thread(activate, edge.base, lab["c_8865"], code)
        assert (wrong_model.status, wrong_model.json()["error"]) == (400, "invalid_grant")
        assert wrong_model.json()["error_description"] == "activation code not accepted"
    reasons = [e.get("reason", "") for e in logs]
    assert "no client certificate (MIC) presented" in reasons
    assert any("does not chain to the manufacturing trust" in r for r in reasons)
    assert "code is bound to model 8841" in reasons
    assert all(code not in repr(e) for e in logs)

    # A device that does not allow remote activation keeps its code for the LAN.
    _, local_code = await edge.device(allow_remote=False)
    with structlog.testing.capture_logs() as logs:
        local = await in_thread(activate, edge.base, lab["b"], local_code)
    assert (local.status, local.json()["error"]) == (400, "invalid_grant")
    assert any("remote activation not allowed" in e.get("reason", "") for e in logs)
    assert edge.service.registry.outstanding_codes()

    # The enterprise switch.
    edge.service.config = replace(edge.service.config, remote=RemoteSettings(enabled=False))
    off = await in_thread(activate, edge.base, lab["a"], code)
    assert (off.status, off.json()["error"]) == (400, "unauthorized_client")


@pytest_twisted.ensureDeferred
async def test_a_stock_phone_fetches_its_bootstrap_config_with_its_mic_alone(
    edge: Edge, lab: dict[str, Any]
) -> None:
    """Activation by voice through the edge: a trusted MIC, no token, a device of an ``ivr``
    model waiting for its code -> the bootstrap config naming the edge's SIP over TLS."""
    registry = edge.service.registry
    await registry.set_default("8865", Onboarding.IVR)
    await registry.add_device(
        DeviceSpec(
            model="8865",
            mac=MAC_C,
            lines=(Line("4711"),),
            requires_activation=True,
            allow_remote=True,
        )
    )
    await edge.device(mac=MAC_A)  # an activation-code device: no bootstrap for it
    name_c, name_a = f"SEP{MAC_C}.cnf.xml", f"SEP{MAC_A}.cnf.xml"

    served = await in_thread(get_config, edge.base, name_c, lab["c_8865"], None)
    assert served.status == 200, served.body
    body = served.body.decode()
    assert ">Activate<" in body
    assert f"bootstrap-{MAC_C.lower()}" in body
    assert f"<sipPort>{edge.port('sip-oauth')}</sipPort>" in body
    assert f"<securedSipPort>{edge.port('sip-oauth')}</securedSipPort>" in body
    assert "4711" not in body  # the device's own lines come after activation

    refusals = [
        (name_a, lab["a"]),  # a normal activation-code device
        (name_c, lab["stranger_c"]),  # an untrusted certificate naming the ivr MAC
        (name_c, None),  # no certificate at all
        (name_c, lab["a"]),  # another phone's (trusted) MIC
        (f"SEP{MAC_C}.cnf.xml.sgn", lab["c_8865"]),  # only the plain bootstrap config
        ("ITLFile.tlv", lab["c_8865"]),  # nothing else without a token
    ]
    for file_name, mic in refusals:
        refused = await in_thread(get_config, edge.base, file_name, mic, None)
        assert refused.status == 401, (file_name, mic, refused.status)
        assert "bootstrap" not in refused.body.decode()

    # The enterprise switch closes this door as well.
    edge.service.config = replace(edge.service.config, remote=RemoteSettings(enabled=False))
    off = await in_thread(get_config, edge.base, name_c, lab["c_8865"], None)
    assert off.status == 401


@pytest_twisted.ensureDeferred
async def test_an_expired_code_is_refused(edge: Edge, lab: dict[str, Any]) -> None:
    _, code = await edge.device()
    edge.clock.offset = 8 * 86400  # past the default 168 h code lifetime
    with structlog.testing.capture_logs() as logs:
        late = await in_thread(activate, edge.base, lab["a"], code)
    assert (late.status, late.json()["error"]) == (400, "invalid_grant")
    assert "activation code is expired" in [e.get("reason") for e in logs]


@pytest_twisted.ensureDeferred
async def test_failures_are_throttled_with_retry_after(edge: Edge, lab: dict[str, Any]) -> None:
    await edge.device()
    for _ in range(3):  # the failure budget
        wrong = await in_thread(activate, edge.base, lab["a"], "1111222233334444")
        assert wrong.status == 400
    locked = await in_thread(activate, edge.base, lab["a"], "1111222233334444")
    assert locked.status == 429 and int(locked.headers["retry-after"]) >= 1
    assert locked.json()["error"] == "slow_down"


@pytest_twisted.ensureDeferred
async def test_sip_over_tls_with_a_bearer_token(edge: Edge, lab: dict[str, Any]) -> None:
    _, code = await edge.device()
    tokens = (await in_thread(activate, edge.base, lab["a"], code)).json()
    token = tokens["access_token"]
    port = edge.port("sip-oauth")

    status, headers = await in_thread(sip_register, port, lab["a"])
    assert status == 401
    (challenge,) = headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="callboard"')
    assert 'scope="config sip"' in challenge and f'authz_server="{edge.base}"' in challenge

    status, headers = await in_thread(
        sip_register, port, lab["a"], authorization=("Authorization", f"Bearer {token}")
    )
    assert status == 200, headers
    (contact,) = headers["contact"]
    expires = int(contact.rpartition("expires=")[2].split(";")[0])
    assert 0 < expires <= 600  # capped at the token's life (the phone asked for 3600)
    bindings = edge.service.registrar.bindings_for_device(f"SEP{MAC_A}")
    assert [b.aor for b in bindings] == ["sip:1000@127.0.0.1"]

    cisco = ("Proxy-Authorization", f'Bearer token="{token}"')
    status, _ = await in_thread(sip_register, port, lab["a"], authorization=cisco)
    assert status == 200
    status, _ = await in_thread(
        sip_register, port, lab["a"], aor="2000", authorization=("Authorization", f"Bearer {token}")
    )
    assert status == 403  # not a line of the device
    status, headers = await in_thread(
        sip_register, port, lab["b"], authorization=("Authorization", f"Bearer {token}")
    )
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"][0]

    edge.clock.offset = 601  # the access token has expired
    status, headers = await in_thread(
        sip_register, port, lab["a"], authorization=("Authorization", f"Bearer {token}")
    )
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"][0]
    status, headers = await in_thread(sip_register, port, lab["a"], authorization=cisco)
    assert status == 407 and headers["proxy-authenticate"][0].startswith("Bearer ")

    edge.clock.offset = 0
    await edge.service.registry.revoke_tokens(f"SEP{MAC_A}")
    assert edge.service.registrar.bindings_for_device(f"SEP{MAC_A}") == []
    status, headers = await in_thread(
        sip_register, port, lab["a"], authorization=("Authorization", f"Bearer {token}")
    )
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"][0]


@pytest_twisted.ensureDeferred
async def test_the_emulated_phone_activates_refreshes_and_fetches(
    edge: Edge, lab: dict[str, Any]
) -> None:
    from callboard.phone.boot import PhoneIdentity
    from callboard.phone.remote import EdgeClient

    _, code = await edge.device()
    identity = PhoneIdentity(
        mac=MAC_A,
        model="8841",
        mic_cert=certs.load_certificate(lab["a"][0]),
        mic_key=certs.load_private_key(lab["a"][1]),
        code=code,
    )
    moments = [1000.0]
    client = EdgeClient(reactor, edge.base, identity, now=lambda: moments[0])
    first = await client.activate(code)
    assert first.device_name == f"SEP{MAC_A}" and first.expires_at == 1600.0
    assert await client.fresh_access_token() == first.access_token
    moments[0] = 1590.0  # within a minute of expiry: refresh first
    token = await client.fresh_access_token()
    assert token != first.access_token and client.tokens is not None
    assert client.tokens.refresh_token != first.refresh_token
    config = await client.fetch(first.config_url)
    assert b"<transportLayerProtocol>3</transportLayerProtocol>" in config
