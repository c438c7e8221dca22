"""The TVS judges the MIC on every connection: its TLS context never resumes a session.

A resumed handshake carries no certificate, so a phone resuming a TVS session would reach the
handler without showing its MIC again. In-memory handshakes (pyOpenSSL over memory BIOs): the
phone offers the session of its first connection; the TVS context makes it a full handshake
with the MIC, where the resumable HTTPS options (the contrast) resume it.
"""

from __future__ import annotations

import contextlib

from callboard.phone.tls_client import shared_client_context
from callboard.protocols import tls
from callboard.protocols.tvs import labpki
from callboard.protocols.tvs.server import make_server_context
from OpenSSL import SSL


def _pump(source: SSL.Connection, sink: SSL.Connection) -> None:
    while True:
        try:
            sink.bio_write(source.bio_read(65536))
        except SSL.WantReadError:
            return


def _connect(
    server_context: SSL.Context, mic: labpki.CertKeyPair, session: SSL.Session | None
) -> tuple[SSL.Connection, SSL.Connection, list[int]]:
    """One handshake and one exchange; (server, client, depths the client's check saw)."""
    seen: list[int] = []
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(shared_client_context(), None)
    client.set_connect_state()
    client.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, depth, _ok: seen.append(depth) or True)
    client.use_certificate(mic.cert)
    client.use_privatekey(mic.key)
    if session is not None:
        client.set_session(session)
    for _ in range(6):
        for side, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                side.do_handshake()
            _pump(side, other)
    client.send(b"ping")
    _pump(client, server)
    assert server.recv(16) == b"ping"
    server.send(b"pong")  # the TLS 1.3 tickets travel before it
    _pump(server, client)
    assert client.recv(16) == b"pong"
    return server, client, seen


def _second_connection(context: SSL.Context) -> tuple[SSL.Connection, list[int]]:
    lab = labpki.make_lab_ca("ec")
    mic = labpki.issue_mic(lab, model="8841", mac="00AABBCCDDEE", serial="T1")
    _server, client, _seen = _connect(context, mic, None)
    server, _client, seen = _connect(context, mic, client.get_session())
    return server, seen


def test_a_phone_offering_its_session_to_the_tvs_shows_its_mic_again() -> None:
    lab = labpki.make_lab_ca("ec")
    tvs = labpki.issue_mic(lab, model="8841", mac="00AABBCCDDEF", serial="T2")
    server, seen = _second_connection(make_server_context(tvs.cert, tvs.key).getContext())
    assert seen  # a full handshake: the phone saw the server's certificate again
    peer = server.get_peer_certificate(as_cryptography=True)
    assert peer is not None and "00AABBCCDDEE" in peer.subject.rfc4514_string()


def test_the_resumable_options_do_resume_so_the_check_above_can_fail() -> None:
    lab = labpki.make_lab_ca("ec")
    https = labpki.issue_mic(lab, model="8841", mac="00AABBCCDDEF", serial="T3")
    options = tls.server_options(https.cert, https.key, resumable=True)
    _server, seen = _second_connection(options.getContext())
    assert seen == []  # resumed: no certificate shown, none checked
