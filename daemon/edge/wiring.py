"""Wiring the edge into the service tree (``CallboardService._wire_edge`` calls :func:`wire_edge`).

Reads or creates, at start-up: the edge's server certificate (``edge.cert``/``edge.key``, else
``<state-dir>/certs/edge.{pem,key}``) and the cluster's token-signing key
(``<state-dir>/certs/edge-token.key``). Adds the listeners ``edge`` (HTTPS) and
``sip-oauth`` (SIP over TLS); each asks every client for its certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from callboard.protocols.filesource import DirectorySource, FileNotFound, Requester
from callboard.protocols.http.channel import bounded
from callboard.protocols.listening import ListenerSpec, listeners_in
from callboard.protocols.sip.registrar import Registrar, RegistrationPolicy
from callboard.protocols.sip.transports import make_stream_factory
from callboard.protocols.tls import server_options
from callboard.protocols.tvs.activation import ManufacturingTrust, PeerContext
from callboard.protocols.tvs.codec import BadElements, DeviceName
from callboard.protocols.tvs.labpki import load_certificate, load_private_key, new_key
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

from .. import certs
from ..activation import RegistryAuthority
from ..ivr import HOTLINE_FILE, BootstrapAccounts, BootstrapPolicy, bootstrap_config
from ..logs import get_logger
from ..provisioning import ProvisioningTree
from ..registry.model import Device
from ..sip_policy import RegistryPolicy
from .grants import TokenEndpoint
from .pinned import NotPinned, PinnedMic, PinnedMicPolicy
from .settings import OFF
from .sip import BearerPolicy, EdgeBootstrapGate, EdgeCallGate, edge_bootstrap_refusal
from .tokens import TOKEN_KEY_NAME, TokenService, load_or_create_signing_key
from .web import ConfigResource, edge_root

if TYPE_CHECKING:
    from ..service import CallboardService

log = get_logger("callboard.edge")

EDGE_STEM = "edge"
#: Bytes of a request body the edge reads before refusing it 413: a token request is a form of
#: a few hundred bytes.
EDGE_MAX_BODY = 64 * 1024


@dataclass
class Edge:
    """The wired edge, for the service and tests."""

    tokens: TokenService
    endpoint: TokenEndpoint
    tree: ProvisioningTree
    registrar: Registrar | None


class _QuietSite(Site):
    """No access log: a misbehaving client could put a code in the query string; the
    resources log what matters themselves."""

    def log(self, request: Any) -> None:
        pass


class EdgeTree(ProvisioningTree):
    """The provisioning tree as the edge serves it: configs name the edge's SIP over TLS,
    which a phone uses only in a secure device-security mode (encrypted, 3)."""

    def render_device(self, device: Device) -> bytes:
        rendered = super().render_device(device)
        for mode in (b"1", b"2"):  # the LAN's choice, whatever the transport there
            rendered = rendered.replace(
                b"<deviceSecurityMode>" + mode + b"</deviceSecurityMode>",
                b"<deviceSecurityMode>3</deviceSecurityMode>",
            )
        return rendered


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def edge_certificate(state_dir: Path, cert: str, key: str, host: str) -> tuple[Any, Any]:
    """The configured pair, else the generated ``certs/edge.{pem,key}`` (EC P-256)."""
    if cert:
        return load_certificate(cert), load_private_key(key)
    directory = state_dir / certs.CERTS_SUBDIR
    cert_path, key_path = directory / f"{EDGE_STEM}.pem", directory / f"{EDGE_STEM}.key"
    if cert_path.exists() and key_path.exists():
        return load_certificate(cert_path), load_private_key(key_path)
    private = new_key("ec")
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, host),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Callboard"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Edge"),
        ]
    )
    issued = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(private, hashes.SHA256())
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    certs.write_pair(directory, EDGE_STEM, issued, private)
    log.info("created the edge certificate", path=str(cert_path))
    return issued, private


def wire_edge(service: CallboardService) -> Edge | None:
    """Build the edge over the service's registry, TVS rules and provisioning tree."""
    config = service.config
    settings = config.edge
    if not settings.enabled:
        return None
    host = settings.public_host or config.advertise_address
    cert, key = edge_certificate(config.state_dir, settings.cert, settings.key, host)
    signing_key = load_or_create_signing_key(config.state_dir / certs.CERTS_SUBDIR / TOKEN_KEY_NAME)

    def bound(label: str, configured: int) -> int:
        for listener in listeners_in(service):
            address = listener.address()
            if listener.label == label and address is not None:
                return address[1]
        return configured

    def issuer() -> str:
        port = settings.public_port or bound("edge", settings.port)
        return f"https://{_url_host(host)}:{port}"

    def sip_port() -> int:
        return settings.public_sip_port or bound("sip-oauth", settings.sip_oauth_port)

    def remote_enabled() -> bool:
        return service.config.remote.enabled

    def trust() -> ManufacturingTrust:
        return service.tvs.handler.trust

    tokens = TokenService(
        signing_key,
        issuer,
        access_ttl=settings.access_token_ttl,
        refresh_ttl=settings.refresh_token_ttl,
    )
    tree = EdgeTree(
        service.registry,
        _edge_provisioning(service, host, 0),
        DirectorySource(str(config.tftp_root_path)),
        trust_list=lambda: _trust_list(service.tree),
        template_dir=config.state_dir / "templates",
        phones=config.phones,
        signer=service.signer,
    )

    def advertise() -> None:
        wanted = _edge_provisioning(service, host, sip_port())
        if tree.settings != wanted:
            tree.advertise(wanted)

    def describe(device: Device) -> dict[str, Any]:
        mac = device.mac or ""
        port = sip_port()
        first = device.lines[0].directory_number if device.lines else None
        return {
            "config_url": f"{issuer()}/config/SEP{mac}.cnf.xml",
            "sip_registrar": f"sip:{_url_host(host)}:{port};transport=tls",
            "sip_uri": f"sip:{first}@{_url_host(host)};transport=tls" if first else None,
        }

    pinned = PinnedMic(
        registry=service.registry,
        trust=trust,
        remote_enabled=remote_enabled,
        allow_sha1=lambda: service.config.tvs.allow_sha1_mic,
        now=service.now,
    )
    handler = service.tvs.handler
    endpoint = TokenEndpoint(
        trust=trust,
        authority=RegistryAuthority(service.registry),
        registry=service.registry,
        tokens=tokens,
        tvs_settings=config.tvs,
        device_throttle=handler.throttle,
        source_throttle=handler.source_throttle,
        remote_enabled=remote_enabled,
        describe=describe,
    )
    options = server_options(cert, key)
    registrar: Registrar | None = None
    if settings.port != OFF:
        config_resource = ConfigResource(
            tree=tree,
            tokens=tokens,
            registry=service.registry,
            remote_enabled=remote_enabled,
            realm=settings.realm,
            sgn_signer=service.server_certs.sgn_signer,
            before_serving=advertise,
            now=service.now,
            bootstrap=lambda peer, name: _bootstrap_through_edge(
                service, tree, trust(), peer, name
            ),
            pinned=lambda peer: _pinned_device(pinned, peer),
        )
        root = edge_root(
            issuer=issuer, tokens=tokens, endpoint=endpoint, config=config_resource, now=service.now
        )
        site = _QuietSite(root, timeout=60)  # type: ignore[no-untyped-call]
        bounded(site, max_body=EDGE_MAX_BODY)
        site.displayTracebacks = False
        site.noisy = False
        for address in config.network.listen_addresses:
            spec = ListenerSpec.stream(address, settings.port)
            service._add_listener("edge", spec, TLSMemoryBIOFactory(options, False, site))
    if settings.sip_oauth_port != OFF:
        policy: RegistrationPolicy = BearerPolicy(
            tokens=tokens,
            registry=service.registry,
            realm=settings.realm,
            authz_server=issuer,
            remote_enabled=remote_enabled,
            now=service.now,
        )
        # A stock phone after activation: its pinned MIC and its lines' digest (the LAN's).
        policy = PinnedMicPolicy(policy, RegistryPolicy(service.registry, None), pinned)
        ivr = service.ivr
        if ivr is not None:  # stock phones: the bootstrap account, MIC required (docs/REMOTE.md)
            policy = EdgeBootstrapGate(
                BootstrapPolicy(policy, ivr.accounts, require_mic=True),
                ivr.accounts,
                remote_enabled,
            )
        registrar = Registrar(
            policy,
            config.sip,
            now=service.now,
            wall_now=service.now,
            # One location service: `device show` lists these bindings, drops reach them.
            location=service.registrar.location,
        )
        if ivr is not None:  # the activation call, answered by the LAN's IVR
            registrar.request_handler = EdgeCallGate(
                ivr.dialogs,
                ivr.accounts,
                remote_enabled,
                remote_calls=ivr.remote_calls,
                warning_host=config.sip.warning_host,
            )
        factory = TLSMemoryBIOFactory(options, False, make_stream_factory(registrar, "tls"))
        for address in config.network.listen_addresses:
            spec = ListenerSpec.stream(address, settings.sip_oauth_port)
            service._add_listener("sip-oauth", spec, factory)
        service.registry.subscribe(_drop_on_revocation(registrar))
    log.info("edge wired", issuer_host=host, edge_port=settings.port, sip=settings.sip_oauth_port)
    return Edge(tokens, endpoint, tree, registrar)


def _edge_provisioning(service: CallboardService, host: str, sip_port: int) -> Any:
    """What configs served through the edge advertise: the edge's SIP over TLS."""
    return replace(
        service.tree.settings,
        address=host,
        sip_port=sip_port,
        sip_tls_port=sip_port,
        transport="tls",
    )


def _pinned_device(pinned: PinnedMic, peer: PeerContext) -> Device | None:
    """The device this connection's MIC is pinned to (the verdict cached on the
    connection), or None."""
    if peer.leaf is None:
        return None
    if peer.verdict is None:
        peer.verdict = pinned.verdict(peer.leaf, peer.chain)
    try:
        device = pinned.device(peer.verdict)
    except NotPinned as exc:
        log.debug("edge config: no pinned MIC", source=peer.source, reason=str(exc))
        return None
    log.info("edge config by pinned MIC", device=device.name, source=peer.source)
    return device


def _bootstrap_through_edge(
    service: CallboardService,
    tree: ProvisioningTree,
    trust: ManufacturingTrust,
    peer: PeerContext,
    name: str,
) -> bytes | None:
    """What a phone with no token may fetch through the edge to activate by voice: its own
    bootstrap config (daemon/ivr.py) and the hotline's dial template it names, when this
    connection's MIC chains to the manufacturing trust and names a MAC that may activate so
    (a known device must allow remote activation too); None otherwise."""
    accounts = service.ivr.accounts if service.ivr is not None else None
    if accounts is None or not service.config.remote.enabled:
        return None
    mac = _bootstrap_mac(service, trust, peer, accounts)
    if mac is None:
        return None
    if name == f"sep{mac.lower()}.cnf.xml":
        return bootstrap_config(tree.render_device, accounts, mac)
    generated = service.tree.generated.get(name) if name == HOTLINE_FILE else None
    return generated() if generated is not None else None


def _bootstrap_mac(
    service: CallboardService,
    trust: ManufacturingTrust,
    peer: PeerContext,
    accounts: BootstrapAccounts,
) -> str | None:
    """The MAC this connection's trusted MIC names, if it has a bootstrap account the edge
    may serve."""
    if peer.verdict is None:
        peer.verdict = trust.check(
            peer.leaf,
            peer.chain,
            dt.datetime.fromtimestamp(service.now(), dt.UTC),
            allow_sha1=service.config.tvs.allow_sha1_mic,
        )
    try:
        named = DeviceName.parse(peer.verdict.common_name or "") if peer.verdict.ok else None
    except BadElements:
        named = None
    if named is None:
        return None
    mac = named.mac.upper()
    account = accounts.for_mac(mac)
    if account is None or edge_bootstrap_refusal(account, remote_enabled=True) is not None:
        return None
    return mac


def _trust_list(tree: ProvisioningTree) -> bytes | None:
    """The main tree's signed ITL, the same bytes phones get on the LAN."""
    try:
        body = tree.open("ITLFile.tlv", Requester("edge", 0, "http"))
    except FileNotFound:
        return None
    if isinstance(body, Deferred):  # the trust list is built at start: never deferred
        return None
    try:
        return body.read_at(0, body.size)
    finally:
        body.close()


def _drop_on_revocation(registrar: Registrar) -> Any:
    def listener(old: Device | None, new: Device | None) -> None:
        if old is None:
            return
        if new is None or new.token_generation != old.token_generation:
            registrar.drop_device(old.name)

    return listener
