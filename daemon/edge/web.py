"""The HTTPS edge as twisted.web resources: metadata, the token endpoint, config files.

    /.well-known/oauth-authorization-server   RFC 8414 metadata
    /.well-known/jwks.json                    the token-signing key (RFC 7517)
    /oauth/token                              POST: the activation-code and refresh grants
    /config/<file>                            GET with a bearer token bound to the MIC, or
                                              with no token from the device's pinned MIC

The TLS layer asks every client for a certificate and accepts any (``protocols.tls``); what
it is worth is judged here, per request, from the connection's certificates.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from callboard.protocols.filesource import (
    FileNotFound,
    FileSource,
    Opened,
    Requester,
)
from callboard.protocols.http.resource import ProvisioningResource
from callboard.protocols.oauth import (
    OAuthError,
    bearer_challenge,
    bearer_from_http,
    metadata,
    parse_token_request,
)
from callboard.protocols.tvs.activation import PeerContext
from callboard.protocols.tvs.sgn import build_signed
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from ..logs import get_logger
from ..provisioning import ProvisioningTree
from ..registry.model import Device
from ..registry.registry import Registry
from .grants import HTTPReply, TokenEndpoint
from .tokens import ALGORITHM, SCOPE, TokenRejected, TokenService, current_device

log = get_logger("callboard.edge")

_SEP_CONFIG = re.compile(r"^sep([0-9a-f]{12})\.cnf\.xml(\.sgn)?$")
_PEER_ATTRIBUTE = "_callboard_edge_peer"


def peer_of(request: server.Request) -> PeerContext:
    """The connection's client certificates (read once per connection, then cached on it)."""
    channel = request.channel
    cached = getattr(channel, _PEER_ATTRIBUTE, None)
    if isinstance(cached, PeerContext):
        return cached
    leaf: x509.Certificate | None = None
    chain: list[x509.Certificate] = []
    handle = getattr(channel.transport, "getHandle", None)
    conn = handle() if handle is not None else None
    if isinstance(conn, SSL.Connection):
        leaf = conn.get_peer_certificate(as_cryptography=True)
        chain = list(conn.get_peer_cert_chain(as_cryptography=True) or [])
    address = request.getClientAddress()
    peer = PeerContext(source=str(getattr(address, "host", "unknown")), leaf=leaf, chain=chain)
    setattr(channel, _PEER_ATTRIBUTE, peer)
    return peer


def _write(request: server.Request, reply: HTTPReply) -> None:
    status, headers, body = reply
    request.setResponseCode(status)
    for name, value in headers:
        request.setHeader(name, value)
    request.setHeader("Content-Length", str(len(body)))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


class _Document(Resource):
    """A small JSON document computed per request."""

    isLeaf = True

    def __init__(self, render_body: Callable[[], bytes]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._body = render_body

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader("Content-Type", "application/json")
        return self._body()


class TokenResource(Resource):
    """``POST /oauth/token``."""

    isLeaf = True

    def __init__(self, endpoint: TokenEndpoint, now: Callable[[], float]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._endpoint = endpoint
        self._now = now

    def render(self, request: server.Request) -> int:
        method = (request.method or b"").decode("ascii", "replace")
        query = request.uri.partition(b"?")[2]
        body = request.content.read() if request.content is not None else b""
        content_type = request.getHeader("content-type")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(reply: HTTPReply) -> None:
            if not gone:
                _write(request, reply)

        try:
            parsed = parse_token_request(method, content_type, body, query)
        except OAuthError as exc:
            send((exc.status, exc.headers(), exc.body()))
            return server.NOT_DONE_YET
        self._endpoint.handle(parsed, peer_of(request), self._now()).addCallback(send)
        return server.NOT_DONE_YET


class _DeviceFiles:
    """The provisioning tree as one device sees it through the edge: its own config, the
    trust list and the served files, nothing of another device."""

    def __init__(self, tree: ProvisioningTree, device: Device) -> None:
        self._tree = tree
        self._device = device

    def open(self, name: str, requester: Requester) -> Opened:
        relative = name.removeprefix("config/")
        m = _SEP_CONFIG.match(relative.lower())
        if m and m.group(1).upper() != self._device.mac:
            raise FileNotFound(relative)
        return self._tree.open(relative, requester)


class ConfigResource(Resource):
    """``GET /config/<file>``: bearer token (RFC 6750) bound to this connection's MIC; without
    a token, the device ``pinned`` finds for the connection's MIC (served the same way)."""

    isLeaf = True

    def __init__(
        self,
        *,
        tree: ProvisioningTree,
        tokens: TokenService,
        registry: Registry,
        remote_enabled: Callable[[], bool],
        realm: str,
        sgn_signer: Callable[[], tuple[x509.Certificate, rsa.RSAPrivateKey] | None],
        before_serving: Callable[[], None],
        now: Callable[[], float],
        bootstrap: Callable[[PeerContext, str], bytes | None] | None = None,
        pinned: Callable[[PeerContext], Device | None] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._pinned = pinned
        self._bootstrap = bootstrap
        self._tree = tree
        self._tokens = tokens
        self._registry = registry
        self._remote_enabled = remote_enabled
        self._realm = realm
        self._sgn_signer = sgn_signer
        self._before_serving = before_serving
        self._now = now
        self._signed: dict[str, tuple[int, bytes]] = {}

    def render(self, request: server.Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader("Allow", "GET, HEAD")
            return b"method not allowed\n"
        device = None
        if request.getHeader("authorization") is None:
            # No token: the device whose MIC is pinned (docs/REMOTE.md §9), else a bootstrap.
            device = self._pinned(peer_of(request)) if self._pinned is not None else None
            bootstrap = self._bootstrap_config(request) if device is None else None
            if bootstrap is not None:
                return bootstrap
        device = device or self._authorised(request)
        if device is None:
            return b"unauthorized\n"
        self._before_serving()
        name = b"/".join(request.postpath or []).decode("utf-8", "surrogateescape")
        m = _SEP_CONFIG.match(name.lower())
        if m and m.group(2) and m.group(1).upper() == device.mac:
            return self._signed_config(request, device, name)
        source: FileSource = _DeviceFiles(self._tree, device)
        return ProvisioningResource(source).render(request)

    def _bootstrap_config(self, request: server.Request) -> bytes | None:
        """A stock phone with no token yet: its own ``SEP<MAC>.cnf.xml`` as a bootstrap config
        (activation by voice), or a file that config names (the hotline's dial template),
        when its trusted MIC names a MAC that may activate so. ``bootstrap`` decides from
        the connection and the lower-case file name."""
        name = b"/".join(request.postpath or []).decode("utf-8", "surrogateescape").lower()
        m = _SEP_CONFIG.match(name)
        if self._bootstrap is None or (m is not None and m.group(2)):
            return None
        self._before_serving()  # the edge's SIP over TLS port in the config
        peer = peer_of(request)
        body = self._bootstrap(peer, name)
        if body is None:
            return None
        log.info("edge bootstrap file served", file=name, source=peer.source)
        request.setHeader("Content-Type", "text/xml")
        request.setHeader("Cache-Control", "no-store")
        request.setHeader("Content-Length", str(len(body)))
        return body

    def _authorised(self, request: server.Request) -> Device | None:
        """The device the request's token speaks for on this connection, or None after
        answering 401 (RFC 6750 §3: no error code when no token was sent)."""
        token = bearer_from_http(request.getHeader("authorization"))
        peer = peer_of(request)
        reason = "no bearer token"
        if token is not None:
            sha = peer.leaf.fingerprint(hashes.SHA256()).hex() if peer.leaf is not None else None
            try:
                claims = self._tokens.check_access(token, sha, self._now())
                return current_device(claims, self._registry, remote_enabled=self._remote_enabled())
            except TokenRejected as exc:
                reason = str(exc)
        log.info("edge config refused", source=peer.source, reason=reason)
        request.setResponseCode(401)
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        request.setHeader("Cache-Control", "no-store")
        request.setHeader(
            "WWW-Authenticate",
            bearer_challenge(self._realm, scope=SCOPE)
            if token is None
            else bearer_challenge(
                self._realm, error="invalid_token", description="token not accepted"
            ),
        )
        return None

    def _signed_config(self, request: server.Request, device: Device, name: str) -> bytes | int:
        """``SEP<MAC>.cnf.xml.sgn``, signed off the reactor (RSA) once per device version."""
        signer = self._sgn_signer()
        if signer is None:
            request.setResponseCode(404)
            return b"not found\n"
        cached = self._signed.get(device.id)
        if cached is not None and cached[0] == device.version:
            return self._send_signed(request, cached[1])
        plain = self._tree.render_device(device)
        cert, key = signer
        unsigned = name[: -len(".sgn")]
        d: Deferred[bytes] = deferToThread(
            build_signed, plain, unsigned, cert, key, int(self._now())
        )

        def signed(data: bytes) -> None:
            self._signed[device.id] = (device.version, data)
            request.setHeader("Content-Type", "application/octet-stream")
            _write(request, (200, [], data))

        def failed(failure: Failure) -> None:
            log.error("edge .sgn signing failed", device=device.name, error=repr(failure.value))
            _write(request, (500, [("Content-Type", "text/plain")], b"internal error\n"))

        d.addCallbacks(signed, failed)
        return server.NOT_DONE_YET

    @staticmethod
    def _send_signed(request: server.Request, data: bytes) -> bytes:
        request.setHeader("Content-Type", "application/octet-stream")
        request.setHeader("Content-Length", str(len(data)))
        return b"" if request.method == b"HEAD" else data


def edge_root(
    *,
    issuer: Callable[[], str],
    tokens: TokenService,
    endpoint: TokenEndpoint,
    config: ConfigResource,
    now: Callable[[], float],
) -> Resource:
    root = Resource()
    well_known = Resource()
    well_known.putChild(
        b"oauth-authorization-server",
        _Document(lambda: metadata(issuer(), scopes=SCOPE.split(), signing_algorithms=[ALGORITHM])),
    )
    well_known.putChild(b"jwks.json", _Document(tokens.jwks))
    oauth = Resource()
    oauth.putChild(b"token", TokenResource(endpoint, now))
    root.putChild(b".well-known", well_known)
    root.putChild(b"oauth", oauth)
    root.putChild(b"config", config)
    return root
