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

from callboard.protocols import tls
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
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import Site

from . import certs
from .activation import RegistryAuthority
from .admin.api import AdminAPI, iso
from .admin.app import AdminApp
from .config import Config
from .edge.wiring import wire_edge
from .inherited import InheritedSockets
from .instrument import CountingAuthority, instrument
from .logs import get_logger
from .metrics import CallboardMetrics, metrics_site
from .provisioning import ProvisioningTree
from .registry.engines import open_store, wake_on_notify
from .registry.model import Device, DeviceState
from .registry.registry import Registry
from .registry.store import SQLiteStore, Store
from .shared_throttle import DAY, open_journal, share_tvs_throttles
from .signing import SgnSigner
from .sip_policy import RegistryPolicy
from .web import site as web_site

log = get_logger("callboard.service")

DATABASE_NAME = "callboard.sqlite3"
# [endpoints] keys and the socket-activation role (FileDescriptorName=) of each.
_ROLES = {
    "http": "http",
    "https": "https",
    "tvs": "tvs",
    "sip": "sip-tcp",
    "sip_tls": "sip-tls",
    "web": "web",
}
THROTTLE_SYNC_INTERVAL = 0.5  # seconds between shared-throttle write-through and read
FEED_PRUNE_INTERVAL = 60.0  # seconds between change-feed retention passes
ATTEMPTS_PRUNE_INTERVAL = 3600.0  # seconds between failed-attempt retention passes


@dataclass
class Listening:
    """Where each listener ended up, for the start-up banner and tests."""

    tftp: list[tuple[str, int]] = field(default_factory=list)
    streams: dict[str, list[str]] = field(default_factory=dict)


class CallboardService(AtomicMultiService):
    """The root of the tree; holds the shared parts for wiring and for tests."""

    def __init__(
        self, config: Config, reactor: Any, inherited: InheritedSockets | None = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        # Sockets handed over by systemd socket activation; empty: bind as configured.
        self.inherited = inherited or InheritedSockets()
        self.started_at: float | None = None
        # The tree's one time source: the reactor's clock (wall-clock seconds, which code
        # expiry and the SIP Date header need; a test's MemoryReactorClock drives it all).
        # Timers go through the reactor itself (IReactorTime).
        self.now: Callable[[], float] = reactor.seconds
        self.store: Store | None = None
        self._closing: list[Callable[[], Deferred[None]]] = []  # closed with the store

    # -- lifecycle -----------------------------------------------------------------------

    def startService(self) -> None:
        self._open_state()
        try:
            self._wire()
            super().startService()
            self._advertise_bound_ports()
            self.started_at = self.now()
        except BaseException:
            for child in list(self):
                self.removeService(child)  # type: ignore[no-untyped-call]
            self._close_state()
            raise

    def stopService(self) -> Deferred[Any]:
        from .lifecycle import drain

        # Stop accepting, let in-flight transfers and TVS requests finish (within
        # shutdown_grace), then stop the rest and close the registry.
        d = drain(self, self.config.shutdown_grace).addCallback(
            lambda _: super(CallboardService, self).stopService()
        )

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
        self.store = open_store(config.store.url, state_dir, self.reactor)
        try:
            self.registry = Registry(self.store, self.now, config.registry)
            # Workers of one box, or nodes on one PostgreSQL: others write the registry too.
            self.registry.shared = config.workers > 1 or not isinstance(self.store, SQLiteStore)
            if not certs.certs_present(state_dir):
                log.info("creating server certificates", directory=str(state_dir / "certs"))
                certs.init_certs(state_dir, key_type=config.trust.key_type)
            self.server_certs = certs.load_server_certs(state_dir)
            self.trust = self._load_trust()
            self._open_web_state()
        except BaseException:
            self._close_state()
            raise

    def _close_state(self) -> Deferred[None]:
        """Close the store once its writer has drained (every acknowledged write is on disk)."""
        store, self.store = self.store, None
        closing, self._closing = self._closing, []
        for close in closing:
            close()
        return store.close() if store is not None else succeed(None)

    # -- wiring (no I/O: every socket is bound when the children start) --------------------

    def _wire(self) -> None:
        self._wire_file_service()
        self._wire_https()
        self.tvs = self._wire_tvs()
        self._wire_shared_throttle()
        self._wire_registrar()
        self._wire_ivr()
        self._wire_edge()
        self.admin_app = AdminApp(self.registry, self.registrations, self.cluster_status)
        self.admin_app.cluster_registrations = self.cluster_registrations
        self.admin_api = AdminAPI(self.admin_app)
        self.admin_app.backup_to = self._backup
        # Other writers of the same database reach this registry through the change feed.
        follower = TimerService(self.registry.settings.feed_interval, self.registry.follow)
        follower.clock = self.reactor
        follower.setServiceParent(self)
        wake_on_notify(self.store, self.registry.follow)  # PostgreSQL: at once, not next poll
        # The feed is bounded: rows no live follower needs go (see Registry.prune_feed).
        pruner = TimerService(FEED_PRUNE_INTERVAL, self.registry.prune_feed)
        pruner.clock = self.reactor
        pruner.setServiceParent(self)
        admin = self.config.endpoints.spec("admin") or ListenerSpec.unix(
            str(self.config.admin_socket_path), mode=0o600, lockfile=True
        )
        self._add_listener("admin", self.inherited.resolve(admin), Site(self._wire_web()))
        self._wire_metrics()

    def _wire_metrics(self) -> None:
        """Metrics hooked into every part; ``/metrics`` served when a port (or socket) is set."""
        from .main import package_version

        self.metrics = CallboardMetrics(version=package_version())
        instrument(self, self.metrics)
        settings = self.config.metrics
        specs = self.inherited.for_role("metrics", "stream") or (
            [ListenerSpec.stream(settings.address, settings.port)] if settings.port else []
        )
        for spec in specs:
            self._add_listener("metrics", spec, self._metrics_site())

    def _metrics_site(self) -> Site:
        """What ``/metrics`` serves (worker 0 of several serves every worker's, see workers)."""
        return metrics_site(self.metrics.registry)

    def _open_web_state(self) -> None:
        """The web's I/O: users and tokens (read from the store) and, with the web listener
        on (a port, an ``[endpoints]`` spec or an inherited ``web`` socket), its certificate
        (made at first start unless ``web.cert`` names one)."""
        assert self.store is not None
        self.accounts = web_site.open_accounts(
            self.registry, self.store, self.reactor, self.config.smtp
        )
        # Users and tokens another process or node changed come in through the change feed.
        self.accounts.store.follow(self.registry)
        adopted = self.inherited.for_role("web", "stream")
        self.web_tls = web_site.web_tls(self.config, adopted=bool(adopted))

    def _wire_web(self) -> Resource:
        """The HTTPS listener (when ``network.web_port`` or ``endpoints.web`` is set) over the
        shared admin app; returns the admin socket's root (user, token and code-send routes
        there, the rest to :class:`AdminAPI`)."""
        config = self.config
        self.web_root = web_site.build_web_root(
            self.admin_app, self.accounts, config.web, config.self_care, self.now
        )
        if self.web_tls is not None:
            factory = web_site.web_factory(self.web_root, self.web_tls)
            for spec in self._stream_specs("web", max(config.network.web_port, 0)):
                self._add_listener("web", spec, factory)
        self.admin_app.known_user = self.accounts.knows_user
        return web_site.SocketAccountRoutes(self.admin_api, self.web_root, self.now)

    def _wire_file_service(self) -> None:
        """TFTP and HTTP over one provisioning tree, with the signed ITL in it."""
        config = self.config
        net = config.network
        itl = self.server_certs.build_itl(
            timestamp=self.server_certs.itl_timestamp(),  # same identity, same bytes
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
                cluster_nodes=config.cluster.nodes,
            ),
            DirectorySource(str(config.tftp_root_path)),
            trust_list=lambda: itl,
            template_dir=config.state_dir / "templates",
            phones=config.phones,
            signer=self._wire_signer(),
        )
        for warning in self.tree.warnings():
            log.warning(warning)
        tftp_specs = self.inherited.for_role(
            "tftp", "datagram", receive_buffer=config.tftp.receive_buffer
        )
        if tftp_specs is None:
            tftp_specs = [
                ListenerSpec.datagram(
                    address, net.tftp_port, receive_buffer=config.tftp.receive_buffer
                )
                for address in net.listen_addresses
            ]
        self.tftp: TFTPService | None = None
        if tftp_specs:  # socket activation without a tftp socket: TFTP is off
            self.tftp = TFTPService(
                self.tree, settings=config.tftp, reactor=self.reactor, listeners=tftp_specs
            )
            # Successful transfers are summarised at info; one line each only when debugging.
            self.tftp.log_each_transfer = config.log_level == "debug"
            self.tftp.setServiceParent(self)  # type: ignore[no-untyped-call]
        site = provisioning_site(self.tree)
        self.http_resource: Any = site.resource
        for spec in self._stream_specs("http", net.http_port):
            self._add_listener("http", spec, site)

    def _wire_signer(self) -> SgnSigner:
        """The CCM+TFTP key signs ``.sgn`` files in its own small thread pool."""
        cert, key = self.server_certs.sgn_signer()
        self.signer = SgnSigner(cert, key, self.reactor, self.now)
        self.signer.setServiceParent(self)  # type: ignore[no-untyped-call]
        return self.signer

    def _wire_https(self) -> None:
        """HTTPS provisioning (6971) for ITL 1.1 phones: the EC TFTP-role certificate, and the
        same tree as HTTP, told the requests come over HTTPS (a SEP config's .sgn name gets
        the unsigned config). Off with port 0 unless ``[endpoints] https`` names a listener."""
        net = self.config.network
        if not net.https_port and self.config.endpoints.spec("https") is None:
            return
        pair = self.server_certs.https_tftp
        options = tls.server_options(pair.cert, pair.key, resumable=True)  # a phone may resume
        site = provisioning_site(self.tree, transport="https")
        for spec in self._stream_specs("https", net.https_port):
            self._add_listener("https", spec, TLSMemoryBIOFactory(options, False, site))

    def _wire_tvs(self) -> TVSTLSFactory:
        self.authority = CountingAuthority(RegistryAuthority(self.registry))
        tvs = make_tvs_factory(
            self.server_certs.tvs.cert,
            self.server_certs.tvs.key,
            self.trust,
            self.authority,
            self.server_certs.itl_records(),
            self.config.tvs,
            self.reactor,
            clock=self.now,
        )
        for spec in self._stream_specs("tvs", self.config.network.tvs_port):
            self._add_listener("tvs", spec, tvs)
        return tvs

    def _wire_shared_throttle(self) -> None:
        """TVS failures counted in the registry's ``attempts`` table, so that processes and
        nodes on one registry share one failure budget (see :mod:`.shared_throttle`)."""
        journal = open_journal(self.config.store.url, self.config.state_dir, self.reactor)
        self.throttle_sync = share_tvs_throttles(
            self.tvs.handler,
            journal,
            self.now,
            self.config.tvs.throttle_window,
            retention=self.config.attempts.days * DAY,
        )
        self.throttle_sync.service(THROTTLE_SYNC_INTERVAL, self.reactor).setServiceParent(self)
        sync = self.throttle_sync
        sync.prune_service(ATTEMPTS_PRUNE_INTERVAL, self.reactor).setServiceParent(self)
        self._closing.append(journal.close)

    def _wire_registrar(self) -> None:
        config = self.config
        net = config.network
        auto = config.autoregistration if config.autoregistration.enabled else None
        from .bindings import wire_bindings

        # Bindings in memory, written behind to the registry for the other nodes to show.
        self.bindings = wire_bindings(self)
        self.registrar = Registrar(
            RegistryPolicy(self.registry, auto),
            config.sip,
            now=self.now,
            wall_now=self.now,
            location=self.bindings.location,
        )
        self.registry.subscribe(self._drop_registrations)
        ccm = self.server_certs.ccm_tftp
        self.sip = SIPRegistrarService(
            self.registrar,
            self.reactor,
            tcp=self._stream_specs("sip", net.sip_port),
            # With port 0, SIP over UDP takes the number SIP over TCP was given.
            udp=self.inherited.for_role(
                "sip-udp", "datagram", receive_buffer=config.sip_transport.udp_receive_buffer
            )
            or [
                ListenerSpec.datagram(
                    address,
                    net.sip_port,
                    receive_buffer=config.sip_transport.udp_receive_buffer,
                )
                for address in net.listen_addresses
                if not self.inherited.activated
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

    def _wire_ivr(self) -> None:
        """Activation by voice: bootstrap configs and accounts, the activation number's UAS."""
        from . import ivr

        settings = self.config.ivr
        self.ivr: ivr.IVRService | None = None
        if not settings.enabled:
            return
        key = ivr.load_key(self.config.state_dir / "ivr.key")
        accounts = ivr.BootstrapAccounts(self.registry, key, settings)
        handler = self.tvs.handler
        accounts.trust, accounts.now = (lambda: handler.trust), self.now
        accounts.allow_sha1 = handler.settings.allow_sha1_mic
        tree = self.tree
        self.tree.bootstrap = lambda mac: ivr.bootstrap_config(tree.render_device, accounts, mac)
        self.tree.generated[ivr.HOTLINE_FILE] = lambda: ivr.hotline_dial_template(settings.number)
        self.registrar.policy = ivr.BootstrapPolicy(self.registrar.policy, accounts)
        self.ivr = ivr.IVRService(
            self.registry,
            self.registrar,
            accounts,
            ivr.Prompts(self.config.state_dir / "prompts"),
            self.reactor,
            rtp_address=settings.rtp_address or self.config.advertise_address,
            device_throttle=self.tvs.handler.throttle,  # the same budgets as TVS
            source_throttle=self.tvs.handler.source_throttle,
        )
        self.registrar.request_handler = self.ivr.dialogs
        ivr.IVRLifecycle(self.ivr).setServiceParent(self)  # type: ignore[no-untyped-call]

    def _wire_edge(self) -> None:
        """Remote activation (OAuth with the MIC) and SIP with bearer tokens, when enabled."""
        self.edge = wire_edge(self)

    def _drop_registrations(self, old: Device | None, new: Device | None) -> None:
        """A device deleted, renamed, back to awaiting activation or given other lines loses
        its bindings (a removed line's, or one registered with an old password)."""
        if old is None:
            return
        stays = (
            new is not None
            and new.name == old.name
            and new.state is not DeviceState.AWAITING_ACTIVATION
            and new.lines == old.lines
        )
        if not stays and self.registrar.drop_device(old.name):
            log.info("registrations dropped", device=old.name)

    def _stream_specs(self, key: str, port: int) -> list[ListenerSpec]:
        """The ``[endpoints]`` spec, else one TCP listener per listen address."""
        override = self.config.endpoints.spec(key)
        if override is not None:
            return [self.inherited.resolve(override)]
        adopted = self.inherited.for_role(_ROLES.get(key, key), "stream")
        if adopted is not None:
            return adopted  # socket activation: this role's sockets, or none (off)
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

    def reload(self, new_config: Config | None = None) -> bool:
        """SIGHUP: apply a re-read configuration's hot settings, templates and trust store.

        Returns False when nothing changed because something was refused (logged why).
        """
        if not self.running:
            return False
        from .reload import apply_reload

        return apply_reload(self, new_config or self.config)

    def _backup(self, path: str) -> Deferred[None]:
        """``callboard backup``: the store's online copy of the registry."""
        from pathlib import Path

        from twisted.internet.defer import fail

        from .admin.app import Problem

        if not isinstance(self.store, SQLiteStore):
            # PostgreSQL has its own online backups (pg_dump, base backups): say so plainly.
            why = "use pg_dump to back up a PostgreSQL registry"
            return fail(Problem(409, "Not supported", why))
        done: Deferred[None] = self.store.backup(Path(path))
        return done

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
                "node": self.bindings.node,
            }
            for b in self.registrar.bindings_for_device(device_name)
        ]

    def cluster_registrations(
        self, device_name: str, local: list[dict[str, Any]]
    ) -> Deferred[list[dict[str, Any]]]:
        """A device's registrations here, then those other nodes hold (from the registry)."""
        from .bindings import with_cluster_registrations

        return with_cluster_registrations(self.bindings, device_name, local, iso)

    def cluster_status(self) -> Deferred[dict[str, Any]]:
        """:meth:`status` plus the live SIP bindings of the whole cluster, by node.

        A subclass's status may itself be a Deferred (worker 0 gathers the other workers').
        """
        from .bindings import with_cluster_status

        own: Deferred[dict[str, Any]] = maybeDeferred(self.status)
        return own.addCallback(lambda status: with_cluster_status(self.bindings, status))

    def status(self) -> dict[str, Any]:
        """Where each listener is, plus live counters (for `callboard status`)."""
        from collections import Counter

        from .instrument import lockouts
        from .main import package_version

        where = self.listening()
        registry = self.registry
        return {
            "tftp": [f"{h}:{p}" for h, p in where.tftp],
            **where.streams,
            "warnings": self.tree.warnings(),
            "version": package_version(),
            "uptime_seconds": round(self.now() - (self.started_at or self.now()), 1),
            "devices_by_state": dict(Counter(d.state.value for d in registry.devices())),
            "codes_outstanding": len(registry.outstanding_codes()),
            "registrations": self.registrar.binding_count(),
            "lockouts": lockouts(self),
            "counters": {
                "tftp_live_transfers": self.tftp.live_transfers if self.tftp else 0,
                "sgn_signed": self.signer.counters.signed,
                "sgn_cache_hits": self.signer.counters.cache_hits,
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
