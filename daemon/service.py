"""The service tree: one registry shared by every listener, under one ``MultiService``.

Every listener is a :class:`~callboard.protocols.listening.ListenerService` built from a
listener spec: one per listen address (TFTP opens one UDP socket per address so that replies
leave from the address a phone asked), or the spec an ``[endpoints]`` string gives (``tcp:``,
``unix:``, ``systemd:`` socket activation, ``fd:`` an inherited socket).

Building the tree touches nothing. ``startService`` opens the state (directories, database,
server certificates, trust store), wires the parts over it and binds every listener, all or
nothing: a port that cannot be had raises ``CannotListenError`` and leaves nothing running.
One clock serves the whole tree: the reactor's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from callboard.protocols.filesource import DirectorySource
from callboard.protocols.http.resource import provisioning_site
from callboard.protocols.listening import (
    AtomicMultiService,
    ListenerService,
    ListenerSpec,
    listeners_in,
)
from callboard.protocols.sip.registrar import Registrar
from callboard.protocols.sip.transports import SIPRegistrarService, make_tls_server_options
from callboard.protocols.tftp.server import TFTPService
from callboard.protocols.tvs.activation import ManufacturingTrust
from callboard.protocols.tvs.itl import HashAlgorithm
from callboard.protocols.tvs.server import TVSTLSFactory, make_tvs_factory
from cryptography.hazmat.primitives import serialization
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.web.server import Site

from . import certs
from .activation import RegistryAuthority
from .admin.api import AdminAPI, iso
from .admin.app import AdminApp
from .config import Config
from .edge.wiring import wire_edge
from .logs import get_logger
from .provisioning import ProvisioningTree
from .registry.model import Device, DeviceState
from .registry.registry import Registry
from .registry.store import SQLiteStore
from .sip_policy import RegistryPolicy

log = get_logger("callboard.service")

DATABASE_NAME = "callboard.sqlite3"


@dataclass
class Listening:
    """Where each listener ended up, for the start-up banner and tests."""

    tftp: list[tuple[str, int]] = field(default_factory=list)
    streams: dict[str, list[str]] = field(default_factory=dict)


class CallboardService(AtomicMultiService):
    """The root of the tree; holds the shared parts for wiring and for tests."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        # The tree's one time source: the reactor's clock (wall-clock seconds, which code
        # expiry and the SIP Date header need; a test's MemoryReactorClock drives it all).
        # Timers go through the reactor itself (IReactorTime).
        self.now: Callable[[], float] = reactor.seconds
        self.store: SQLiteStore | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def startService(self) -> None:
        self._open_state()
        try:
            self._wire()
            super().startService()
            self._advertise_bound_ports()
        except BaseException:
            for child in list(self):
                self.removeService(child)  # type: ignore[no-untyped-call]
            self._close_state()
            raise

    def stopService(self) -> Deferred[Any]:
        d = super().stopService()

        def close(result: object) -> Deferred[object]:
            return self._close_state().addBoth(lambda _: result)

        return d.addBoth(close)

    def _open_state(self) -> None:
        """The I/O of start-up: directories, database, certificates, trust store."""
        config = self.config
        state_dir = config.state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        config.tftp_root_path.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.store = SQLiteStore(state_dir / DATABASE_NAME, self.reactor)
        try:
            self.registry = Registry(self.store, self.now, config.registry)
            if not certs.certs_present(state_dir):
                log.info("creating server certificates", directory=str(state_dir / "certs"))
                certs.init_certs(state_dir, key_type=config.trust.key_type)
            self.server_certs = certs.load_server_certs(state_dir)
            self.trust = self._load_trust()
        except BaseException:
            self._close_state()
            raise

    def _close_state(self) -> Deferred[None]:
        """Close the store once its writer has drained (every acknowledged write is on disk)."""
        store, self.store = self.store, None
        return store.close() if store is not None else succeed(None)

    # -- wiring (no I/O: every socket is bound when the children start) --------------------

    def _wire(self) -> None:
        self._wire_file_service()
        self.tvs = self._wire_tvs()
        self._wire_registrar()
        self._wire_edge()
        self.admin_app = AdminApp(self.registry, self.registrations, self.status)
        self.admin_api = AdminAPI(self.admin_app)
        # Other writers of the same database reach this registry through the change feed.
        follower = TimerService(self.registry.settings.feed_interval, self.registry.follow)
        follower.clock = self.reactor
        follower.setServiceParent(self)
        admin = self.config.endpoints.spec("admin") or ListenerSpec.unix(
            str(self.config.admin_socket_path), mode=0o600, lockfile=True
        )
        self._add_listener("admin", admin, Site(self.admin_api))

    def _wire_file_service(self) -> None:
        """TFTP and HTTP over one provisioning tree, with the signed ITL in it."""
        config = self.config
        net = config.network
        itl = self.server_certs.build_itl(
            timestamp=int(self.now()),
            hash_algorithm=HashAlgorithm.SHA1
            if config.trust.itl_hash == "sha1"
            else HashAlgorithm.SHA512,
        )
        self.tree = ProvisioningTree(
            self.registry,
            replace(
                config.provisioning,
                address=config.advertise_address,
                sip_port=net.advertise_sip_port or net.sip_port,
                sip_tls_port=net.advertise_sip_tls_port or net.sip_tls_port,
                tvs_port=net.advertise_tvs_port or net.tvs_port,
            ),
            DirectorySource(str(config.tftp_root_path)),
            trust_list=lambda: itl,
            template_dir=config.state_dir / "templates",
        )
        self.tftp = TFTPService(
            self.tree,
            settings=config.tftp,
            reactor=self.reactor,
            listeners=[
                ListenerSpec.datagram(
                    address, net.tftp_port, receive_buffer=config.tftp.receive_buffer
                )
                for address in net.listen_addresses
            ],
        )
        self.tftp.setServiceParent(self)  # type: ignore[no-untyped-call]
        site = provisioning_site(self.tree)
        for spec in self._stream_specs("http", net.http_port):
            self._add_listener("http", spec, site)

    def _wire_tvs(self) -> TVSTLSFactory:
        tvs = make_tvs_factory(
            self.server_certs.tvs.cert,
            self.server_certs.tvs.key,
            self.trust,
            RegistryAuthority(self.registry),
            self.server_certs.itl_records(),
            self.config.tvs,
            self.reactor,
            clock=self.now,
        )
        for spec in self._stream_specs("tvs", self.config.network.tvs_port):
            self._add_listener("tvs", spec, tvs)
        return tvs

    def _wire_registrar(self) -> None:
        config = self.config
        net = config.network
        auto = config.autoregistration if config.autoregistration.enabled else None
        self.registrar = Registrar(
            RegistryPolicy(self.registry, auto),
            config.sip,
            now=self.now,
            wall_now=self.now,
        )
        self.registry.subscribe(self._drop_registrations)
        ccm = self.server_certs.ccm_tftp
        self.sip = SIPRegistrarService(
            self.registrar,
            self.reactor,
            tcp=self._stream_specs("sip", net.sip_port),
            # With port 0, SIP over UDP takes the number SIP over TCP was given.
            udp=[
                ListenerSpec.datagram(
                    address,
                    net.sip_port,
                    receive_buffer=config.sip_transport.udp_receive_buffer,
                )
                for address in net.listen_addresses
            ],
            tls=self._stream_specs("sip_tls", net.sip_tls_port),
            tls_options=make_tls_server_options(
                ccm.cert.public_bytes(serialization.Encoding.PEM),
                ccm.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            ),
        )
        self.sip.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _wire_edge(self) -> None:
        """Remote activation (OAuth with the MIC) and SIP with bearer tokens, when enabled."""
        self.edge = wire_edge(self)

    def _drop_registrations(self, old: Device | None, new: Device | None) -> None:
        """A device deleted, renamed or back to awaiting activation loses its bindings."""
        if old is None:
            return
        stays = (
            new is not None
            and new.name == old.name
            and new.state is not DeviceState.AWAITING_ACTIVATION
        )
        if not stays and self.registrar.drop_device(old.name):
            log.info("registrations dropped", device=old.name)

    def _stream_specs(self, key: str, port: int) -> list[ListenerSpec]:
        """The ``[endpoints]`` spec, else one TCP listener per listen address."""
        override = self.config.endpoints.spec(key)
        if override is not None:
            return [override]
        return [
            ListenerSpec.stream(address, port) for address in self.config.network.listen_addresses
        ]

    def _add_listener(self, label: str, spec: ListenerSpec, factory: IProtocolFactory) -> None:
        factory.noisy = False  # type: ignore[attr-defined]
        ListenerService(label, spec, factory, self.reactor).setServiceParent(self)  # type: ignore[no-untyped-call]

    @property
    def listeners(self) -> list[ListenerService]:
        """Every listener in the tree (TFTP's and SIP's included), in start order."""
        return list(listeners_in(self))

    def _advertise_bound_ports(self) -> None:
        """Configs name the ports actually listened on (port 0 becomes the real one)."""
        net = self.config.network

        def bound(label: str, configured: int) -> int:
            for listener in self.listeners:
                address = listener.address()
                if listener.label == label and address is not None:
                    return address[1]
            return configured

        self.tree.advertise(
            replace(
                self.tree.settings,
                sip_port=net.advertise_sip_port or bound("sip", net.sip_port),
                sip_tls_port=net.advertise_sip_tls_port or bound("sip-tls", net.sip_tls_port),
                tvs_port=net.advertise_tvs_port or bound("tvs", net.tvs_port),
            )
        )

    # -- operations ----------------------------------------------------------------------

    def _load_trust(self) -> ManufacturingTrust:
        directory = self.config.manufacturing_trust_path
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        trust = certs.load_trust_store(directory)
        if not len(trust):
            log.warning(
                "the manufacturing trust store is empty: no phone can activate",
                directory=str(directory),
            )
        return trust

    def reload(self) -> None:
        """SIGHUP: re-read the manufacturing trust store (a bad store keeps the old one)."""
        if not self.running:
            return
        try:
            trust = self._load_trust()
        except Exception as exc:
            log.error("trust store reload failed; keeping the old one", error=str(exc))
            return
        self.tvs.set_trust(trust)
        log.info("manufacturing trust store reloaded", certificates=len(trust))

    def registrations(self, device_name: str) -> list[dict[str, Any]]:
        return [
            {
                "aor": b.aor,
                "contact": b.contact,
                "transport": b.transport,
                "source": b.source,
                "user_agent": b.user_agent,
                "expires_in": b.expires_in,
                "registered": iso(b.registered_at),
                "client_cert_sha256": b.client_cert_fingerprint,
            }
            for b in self.registrar.bindings_for_device(device_name)
        ]

    def status(self) -> dict[str, Any]:
        """Where each listener is, plus live counters (for `callboard status`)."""
        where = self.listening()
        return {
            "tftp": [f"{h}:{p}" for h, p in where.tftp],
            **where.streams,
            "counters": {
                "tftp_live_transfers": self.tftp.live_transfers,
                **{f"sip_{k}": v for k, v in self.registrar.counters_snapshot().items()},
            },
        }

    def listening(self) -> Listening:
        result = Listening()
        for listener in self.listeners:
            if listener.port is None:
                continue
            address = listener.address()
            if listener.label == "tftp" and address is not None:
                result.tftp.append(address)
            else:
                result.streams.setdefault(listener.label, []).append(listener.where())
        return result
