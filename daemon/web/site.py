"""Wiring the web front door into the daemon: accounts, the HTTPS site, its certificate.

The service tree calls :func:`open_accounts` and :func:`web_tls` while it opens its state
(the accounts are needed even without the web listener, by the CLI's ``user``/``token``/
``code send`` commands), then :func:`build_web_root`, :func:`web_factory` and
:class:`SocketAccountRoutes` while it wires the listeners. Plain HTTP on the web port fails
the TLS handshake: nothing is served in clear.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from callboard.protocols.http.channel import bounded
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ..accounts import AccountsApp
from ..admin.api import socket_actor
from ..admin.app import AdminApp, Problem
from ..config import Config
from ..logs import get_logger
from ..mail import SMTPMailer
from ..registry.accounts import AccountStore, Transactions
from ..registry.registry import Registry
from .api import ApiArea
from .auth import WebAuth
from .core import MAX_BODY, Ctx, WebRoot, problem_response
from .pages import PagesArea
from .sessions import SessionStore, SignInThrottle
from .settings import SelfCareSettings, SMTPSettings, WebSettings

log = get_logger("callboard.web")

WEB_CERT = "web.pem"
WEB_KEY = "web.key"


def security_headers(settings: WebSettings) -> dict[str, str]:
    from .core import CSP

    return {
        "Content-Security-Policy": CSP,
        "Strict-Transport-Security": f"max-age={settings.hsts_seconds}",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    }


# -- the certificate ------------------------------------------------------------------------


def ensure_web_certificate(state_dir: Path, hosts: list[str]) -> tuple[Path, Path]:
    """``<state_dir>/certs/web.{pem,key}``, self-signed at first start (EC P-256)."""
    directory = state_dir / "certs"
    cert_path, key_path = directory / WEB_CERT, directory / WEB_KEY
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(host)]
    for h in dict.fromkeys(["127.0.0.1", "::1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"Callboard web {host}"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Callboard"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("created the web server certificate", path=str(cert_path))
    return cert_path, key_path


def tls_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    pem = cert_path.read_bytes()
    certs = x509.load_pem_x509_certificates(pem)
    leaf = ssl.PrivateCertificate.loadPEM(
        certs[0].public_bytes(serialization.Encoding.PEM) + key_path.read_bytes()
    )
    chain = [
        ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)).original
        for c in certs[1:]
    ]
    return ssl.CertificateOptions(
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=chain,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


# -- the site -------------------------------------------------------------------------------


def build_web_root(
    admin: AdminApp,
    accounts: AccountsApp,
    settings: WebSettings,
    self_care: SelfCareSettings,
    clock: Callable[[], float],
) -> WebRoot:
    sessions = SessionStore(
        settings.session_idle_minutes * 60.0, settings.session_absolute_hours * 3600.0
    )
    throttle = SignInThrottle(
        settings.failure_budget, settings.failure_budget_per_source, settings.failure_window_seconds
    )
    auth = WebAuth(accounts, sessions, throttle)
    areas = [
        PagesArea(admin, accounts, auth, self_care),
        ApiArea(admin, accounts, auth, self_care),
    ]
    return WebRoot(areas, clock, security_headers(settings))


def web_factory(root: WebRoot, options: ssl.CertificateOptions) -> IProtocolFactory:
    """HTTPS only: the site behind TLS (a plain-HTTP client gets a failed handshake)."""
    site = bounded(Site(root), max_body=MAX_BODY)
    site.displayTracebacks = False
    site.noisy = False
    return TLSMemoryBIOFactory(options, False, site)


def web_tls(config: Config, *, adopted: bool = False) -> ssl.CertificateOptions | None:
    """The web listener's TLS options, or None when the web listener is off (no port, no
    ``[endpoints]`` spec and no ``adopted`` socket from systemd).

    ``web.cert``/``web.key`` when configured; else ``<state_dir>/certs/web.{pem,key}``,
    self-signed at first start.
    """
    if config.network.web_port < 0 and not config.endpoints.web and not adopted:
        return None
    settings = config.web
    if settings.cert:
        return tls_options(Path(settings.cert), Path(settings.key or settings.cert))
    hosts = [*config.network.listen_addresses, config.advertise_address]
    return tls_options(*ensure_web_certificate(config.state_dir, hosts))


def open_accounts(
    registry: Registry, store: object, reactor: Any, smtp: SMTPSettings
) -> AccountsApp:
    """Users and tokens, kept in the registry's database and written by its store."""
    if not isinstance(store, Transactions):
        raise TypeError(f"{type(store).__name__} cannot keep the web's users and tokens")
    mailer = SMTPMailer(smtp, reactor) if smtp.host else None
    return AccountsApp(registry, AccountStore(store, registry.now, reactor), mailer)


# -- the admin socket's extra routes ------------------------------------------------------------


class SocketAccountRoutes(Resource):
    """The admin socket: user, token, device-edit and code-send routes here, the rest to
    :class:`~callboard.daemon.admin.api.AdminAPI`.

    The socket's peer is root (or the daemon's user): an admin actor named after the uid,
    whose requests run through the REST API's handlers, so both doors behave the same.
    """

    isLeaf = True
    PREFIXES = ("v1/users", "v1/tokens")

    def __init__(self, fallback: Resource, root: WebRoot, clock: Callable[[], float]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.fallback = fallback
        self.api = next(a for a in root.areas if isinstance(a, ApiArea))
        self.clock = clock

    def _ours(self, method: str, path: str) -> bool:
        return path.startswith(self.PREFIXES) or (
            path.startswith("v1/devices/")
            and (path.endswith("/code/send") or (method == "PATCH" and path.count("/") == 2))
        )

    def render(self, request: Request) -> Any:
        path = "/".join(p.decode("utf-8", "replace") for p in request.postpath or [])
        method = (request.method or b"GET").decode()
        if not self._ours(method, path):
            return self.fallback.render(request)
        request.setHeader(b"content-type", b"application/json")
        route, params, _ = self.api.match(method, "/api/" + path)
        ctx = Ctx(request, self.clock(), params, actor=socket_actor(request))

        async def answer() -> None:
            try:
                if route is None:
                    raise Problem.not_found(f"no route for {method} /{path}")
                response = await route.handler(ctx)
            except Problem as problem:
                response = problem_response(problem)
            request.setResponseCode(response.status)
            request.write(response.body)
            request.finish()

        d = ensureDeferred(answer())

        def crashed(failure: Any) -> None:
            log.error("admin socket request failed", error=failure.getErrorMessage()[:300])
            request.setResponseCode(500)
            request.write(b'{"error": "internal error; see the daemon log"}')
            request.finish()

        d.addErrback(crashed)
        return NOT_DONE_YET
