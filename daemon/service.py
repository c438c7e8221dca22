"""The service tree: one registry shared by every listener, under one ``MultiService``.

Stream listeners are built from endpoint strings (``tcp:…``, ``unix:…``, or ``systemd:…``
for socket activation); TFTP opens one UDP socket per listen address so that replies leave
from the address a phone asked.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from callboard.protocols.filesource import DirectorySource
from callboard.protocols.http.resource import provisioning_site
from callboard.protocols.sip.registrar import Registrar, RegistrarSettings
from callboard.protocols.sip.transports import (
    make_stream_factory,
    make_tls_server_options,
    make_udp_protocol,
)
from callboard.protocols.tftp.server import TFTPService, TFTPSettings
from callboard.protocols.tvs.activation import ManufacturingTrust, TVSSettings
from callboard.protocols.tvs.itl import HashAlgorithm
from callboard.protocols.tvs.server import make_tvs_factory
from cryptography.hazmat.primitives import serialization
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

from . import certs
from .activation import RegistryAuthority
from .admin.api import AdminAPI, iso
from .admin.app import AdminApp
from .config import Config
from .logs import get_logger
from .provisioning import ProvisioningSettings, ProvisioningTree
from .registry.model import Device, DeviceState
from .registry.registry import Registry, RegistrySettings
from .registry.store import SQLiteStore
from .sip_policy import AutoRegistration, RegistryPolicy

log = get_logger("callboard.service")

DATABASE_NAME = "callboard.sqlite3"


def tcp_endpoint(address: str, port: int) -> str:
    return f"tcp:{port}:interface={quoteStringArgument(address)}"


class ListenerService(Service):
    """Listen on one endpoint string with one factory; remember the bound port."""

    def __init__(
        self, label: str, description: str, factory: IProtocolFactory, reactor: Any
    ) -> None:
        self.label = label
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self.port: IListeningPort | None = None
        self.ready: Deferred[IListeningPort] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        endpoint = serverFromString(self._reactor, self.description)
        self.ready = endpoint.listen(self.factory)

        def bound(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        self.ready.addCallback(bound)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None

    def where(self) -> str:
        if self.port is None:
            return self.description
        host: Any = self.port.getHost()
        if hasattr(host, "port"):
            return f"{host.host}:{host.port}"
        name = getattr(host, "name", host)
        return name.decode() if isinstance(name, bytes) else str(name)


@dataclass
class Listening:
    """Where each listener ended up, for the start-up banner and tests."""

    tftp: list[tuple[str, int]] = field(default_factory=list)
    streams: dict[str, list[str]] = field(default_factory=dict)


class CallboardService(MultiService):
    """The root of the tree; holds the shared parts for wiring and for tests."""

    def __init__(
        self, config: Config, reactor: Any, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        state_dir = config.state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        config.tftp_root_path.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.store = SQLiteStore(state_dir / DATABASE_NAME, reactor)
        self.registry = Registry(
            self.store,
            clock,
            RegistrySettings(
                code_ttl_hours=config.registry.code_ttl_hours,
                unique_directory_numbers=config.registry.unique_directory_numbers,
            ),
        )
        # Other writers of the same database reach this registry through the change feed.
        follower = TimerService(self.registry.settings.feed_interval, self.registry.follow)
        follower.clock = reactor
        follower.setServiceParent(self)
        if not certs.certs_present(state_dir):
            log.info("creating server certificates", directory=str(state_dir / "certs"))
            certs.init_certs(state_dir, key_type=config.tvs.key_type)
        self.server_certs = certs.load_server_certs(state_dir)
        self._build_file_service(config, clock)
        self._build_tvs(config, clock)
        self._build_registrar(config, clock)
        self.admin_app = AdminApp(self.registry, self.registrations, self.status)
        self.admin_api = AdminAPI(self.admin_app)
        self.add_listener(
            "admin",
            config.endpoints.admin or unix_endpoint(config.admin_socket_path),
            Site(self.admin_api),
        )

    def _build_file_service(self, config: Config, clock: Callable[[], float]) -> None:
        """TFTP and HTTP over one provisioning tree, with the signed ITL in it."""
        net = config.network
        itl = self.server_certs.build_itl(
            timestamp=int(clock()),
            hash_algorithm=HashAlgorithm.SHA1
            if config.tvs.itl_hash == "sha1"
            else HashAlgorithm.SHA512,
        )
        self.tree = ProvisioningTree(
            self.registry,
            ProvisioningSettings(
                address=config.advertise_address,
                sip_port=net.advertise_sip_port or net.sip_port,
                sip_tls_port=net.advertise_sip_tls_port or net.sip_tls_port,
                tvs_port=net.advertise_tvs_port or net.tvs_port,
                register_expires=config.sip.register_expires,
                keepalive_expires=config.sip.keepalive_expires,
                transport=config.sip.transport,
                loads=dict(config.loads),
            ),
            DirectorySource(str(config.tftp_root_path)),
            trust_list=lambda: itl,
            template_dir=config.state_dir / "templates",
        )
        t = config.tftp
        self.tftp = TFTPService(
            self.tree,
            addresses=list(net.listen_addresses),
            port=net.tftp_port,
            settings=TFTPSettings(
                max_blksize=t.max_blksize,
                max_windowsize=t.max_windowsize,
                initial_timeout=t.initial_timeout,
                max_retries=t.max_retries,
                transfer_deadline=t.transfer_deadline,
                max_transfers=t.max_transfers,
                max_transfers_per_client=t.max_transfers_per_client,
            ),
            reactor=self.reactor,
        )
        self.tftp.setServiceParent(self)  # type: ignore[no-untyped-call]
        site = provisioning_site(self.tree)
        for description in self._streams("http", net.http_port):
            self.add_listener("http", description, site)

    def _build_tvs(self, config: Config, clock: Callable[[], float]) -> None:
        v = config.tvs
        self.tvs = make_tvs_factory(
            self.server_certs.tvs.cert,
            self.server_certs.tvs.key,
            self._load_trust(),
            RegistryAuthority(self.registry),
            self.server_certs.itl_records(),
            TVSSettings(
                idle_timeout=v.idle_timeout,
                max_connections=v.max_connections,
                allow_sha1_mic=v.allow_sha1_mic,
                throttle_budget=v.failure_budget,
                throttle_source_budget=v.failure_budget_per_source or None,
                throttle_window=v.failure_window_seconds,
            ),
            self.reactor,
            clock=clock,
        )
        for description in self._streams("tvs", config.network.tvs_port):
            self.add_listener("tvs", description, self.tvs)

    def _build_registrar(self, config: Config, clock: Callable[[], float]) -> None:
        sip = config.sip
        auto = (
            AutoRegistration(sip.autoregistration_first, sip.autoregistration_last)
            if sip.autoregistration_first
            else None
        )
        self.registrar = Registrar(
            RegistryPolicy(self.registry, auto),
            RegistrarSettings(
                default_expires=sip.default_expires,
                min_expires=sip.min_expires,
                max_expires=sip.max_expires,
                keepalive_expires=sip.keepalive_expires,
                realm=sip.realm,
                digest_algorithms=sip.digest_algorithms,
            ),
            now=self.reactor.seconds,
            wall_now=clock,
        )
        self.registry.subscribe(self._drop_registrations)
        tcp = make_stream_factory(self.registrar, "tcp")
        ccm = self.server_certs.ccm_tftp
        tls = TLSMemoryBIOFactory(
            make_tls_server_options(
                ccm.cert.public_bytes(serialization.Encoding.PEM),
                ccm.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            ),
            False,
            make_stream_factory(self.registrar, "tls"),
        )
        net = config.network
        for description in self._streams("sip", net.sip_port):
            self.add_listener("sip", description, tcp)
        # After SIP/TCP: with port 0, UDP takes the number TCP was given.
        for address in net.listen_addresses:
            SIPDatagramService(self, address, net.sip_port).setServiceParent(self)  # type: ignore[no-untyped-call]
        for description in self._streams("sip_tls", net.sip_tls_port):
            self.add_listener("sip-tls", description, tls)
        # Bindings expire through one periodic sweep, not a timer per binding.
        sweeper = TimerService(self.registrar.settings.sweep_interval, self.registrar.sweep)
        sweeper.clock = self.reactor
        sweeper.setServiceParent(self)

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

    # -- wiring helpers ------------------------------------------------------------------

    def _streams(self, key: str, port: int) -> list[str]:
        """The configured endpoint string, else one TCP listener per listen address."""
        override: str = getattr(self.config.endpoints, key)
        if override:
            return [override]
        return [tcp_endpoint(address, port) for address in self.config.network.listen_addresses]

    def add_listener(self, label: str, description: str, factory: IProtocolFactory) -> None:
        factory.noisy = False  # type: ignore[attr-defined]
        listener = ListenerService(label, description, factory, self.reactor)
        listener.setServiceParent(self)  # type: ignore[no-untyped-call]

    @property
    def listeners(self) -> list[ListenerService]:
        return [s for s in self if isinstance(s, ListenerService)]

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

    # -- lifecycle -----------------------------------------------------------------------

    def ready(self) -> Deferred[Any]:
        """Fires when every listener is bound; fails with the first listener that is not."""
        waits = [ls.ready for ls in self.listeners if ls.ready is not None]
        d: Deferred[Any] = (
            DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
            if waits
            else succeed(None)
        )
        d.addCallback(self._advertise_bound_ports)
        return d

    def _advertise_bound_ports(self, result: object) -> object:
        """Configs name the ports actually listened on (port 0 becomes the real one)."""
        net = self.config.network

        def bound(label: str, configured: int) -> int:
            for ls in self.listeners:
                if ls.label == label and ls.port is not None:
                    return int(getattr(ls.port.getHost(), "port", configured))
            return configured

        self.tree.advertise(
            replace(
                self.tree.settings,
                sip_port=net.advertise_sip_port or bound("sip", net.sip_port),
                sip_tls_port=net.advertise_sip_tls_port or bound("sip-tls", net.sip_tls_port),
                tvs_port=net.advertise_tvs_port or bound("tvs", net.tvs_port),
            )
        )
        return result

    def listening(self) -> Listening:
        result = Listening()
        for port in self.tftp.ports:
            host = port.getHost()
            result.tftp.append((host.host, host.port))  # type: ignore[attr-defined]
        for service in self:
            if isinstance(service, SIPDatagramService) and service.port is not None:
                udp = service.port.getHost()
                result.streams.setdefault("sip-udp", []).append(f"{udp.host}:{udp.port}")
        for ls in self.listeners:
            result.streams.setdefault(ls.label, []).append(ls.where())
        return result

    def stopService(self) -> Deferred[None] | None:
        d: Deferred[None] | None = super().stopService()  # type: ignore[no-untyped-call]

        def close(result: object) -> Deferred[object]:
            return self.store.close().addBoth(lambda _: result)

        if d is None:
            return self.store.close()
        d.addBoth(close)
        return d


class SIPDatagramService(Service):
    """SIP over UDP on one address; with port 0 it takes the port SIP/TCP was given."""

    def __init__(self, parent: CallboardService, address: str, port: int) -> None:
        self._root = parent
        self._address = address
        self._port = port
        self.port: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        port = self._port
        if port == 0:
            for ls in self._root.listeners:
                if ls.label == "sip" and ls.port is not None:
                    host: Any = ls.port.getHost()
                    if host.host == self._address:
                        port = host.port
        self.port = self._root.reactor.listenUDP(
            port, make_udp_protocol(self._root.registrar), interface=self._address
        )

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


def unix_endpoint(path: Path) -> str:
    """An owner-only UNIX socket; ``lockfile`` lets a restart replace a stale socket."""
    return f"unix:address={quoteStringArgument(str(path))}:mode=600:lockfile=1"
