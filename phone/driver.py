"""The Twisted driver of the boot: performs :class:`~callboard.phone.boot.BootSequence` actions.

Fetches go to the provisioning servers in option-150 order (HTTP 6970 first, TFTP as the
fallback, the first server and transport that answers is kept), ACTIVATE goes to the TVS over
TLS with the MIC, REGISTER to the SIP user agent. ACTIVATE and REGISTER walk the config's TVS
and call-manager members in priority order and fall over to the next member when one does not
answer (refused, cut off or silent past the timeout), as a phone of a CUCM cluster does.
:func:`boot_phone` never errbacks: every failure, even a bug, ends as a
:class:`~callboard.phone.boot.BootResult`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from callboard.protocols.tvs import client as tvs_client
from callboard.protocols.tvs.codec import DeviceName
from twisted.internet import defer

from . import tftp_client
from .boot import (
    Action,
    Activate,
    Activated,
    BootOptions,
    BootResult,
    BootSequence,
    CallActivation,
    Feed,
    Fetch,
    Fetched,
    FetchFailed,
    Outcome,
    PhoneIdentity,
    Register,
    Registered,
    Sleep,
    Slept,
    VoiceActivated,
)
from .config import CallManager, DeviceConfig
from .http_client import HttpFetcher, PinMismatch, SecureSessions
from .tls_client import MicClientOptions

__all__ = ["boot_phone"]


def _describe(failure: BaseException) -> str:
    text = str(failure) or type(failure).__name__
    if isinstance(failure, defer.TimeoutError | defer.CancelledError):
        return "timed out"
    return text.splitlines()[0][:200]


class _Fetcher:
    """Server and transport selection: option-150 order, first that answers is kept."""

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[str],
        options: BootOptions,
        http: HttpFetcher,
        secure: SecureSessions | None = None,
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.http = http
        self.secure = secure  # this phone's HTTPS connection and TLS session, when reused
        vias = ("http", "tftp") if options.transport == "auto" else (options.transport,)
        self.candidates = [(server, via) for server in servers for via in vias]
        self.current: tuple[str, str] | None = None

    def _port(self, via: str) -> int:
        return self.options.http_port if via == "http" else self.options.tftp_port

    def _get(self, server: str, via: str, name: str) -> defer.Deferred[bytes | None]:
        opts = self.options
        if via == "http":
            return self.http.fetch(server, opts.http_port, name, timeout=opts.timeout)
        interval = max(0.05, min(1.0, opts.timeout / (opts.tftp_retries + 1)))
        return tftp_client.fetch(
            self.reactor,
            server,
            opts.tftp_port,
            name,
            blksize=opts.tftp_blksize,
            timeout=interval,
            max_retries=opts.tftp_retries,
        )

    async def fetch_pinned(self, action: Fetch) -> Fetched | FetchFailed:
        """HTTPS (6971) from each server in order, the server pinned by the ITL's records."""
        port = self.options.https_port
        errors: list[str] = []
        for server in dict.fromkeys(server for server, _via in self.candidates):
            try:
                data = await self.http.fetch_pinned(
                    server, port, action.name, action.pins, timeout=self.options.timeout,
                    sessions=self.secure,
                )  # fmt: skip
            except PinMismatch as exc:
                return FetchFailed(action.name, str(exc), untrusted=True)
            except Exception as exc:
                errors.append(f"https {server}:{port}: {_describe(exc)}")
                continue
            return Fetched(action.name, data, "https", f"{server}:{port}")
        return FetchFailed(action.name, "; ".join(errors) or "no servers given")

    async def fetch(self, name: str) -> Fetched | FetchFailed:
        order = list(self.candidates)
        if self.current is not None:
            order.remove(self.current)
            order.insert(0, self.current)
        errors: list[str] = []
        for server, via in order:
            try:
                data = await self._get(server, via, name)
            except Exception as exc:
                errors.append(f"{via} {server}:{self._port(via)}: {_describe(exc)}")
                continue
            self.current = (server, via)
            return Fetched(name, data, via, f"{server}:{self._port(via)}")
        return FetchFailed(name, "; ".join(errors) or "no servers given")


async def _activate(
    reactor: Any, identity: PhoneIdentity, action: Activate, options: BootOptions
) -> Activated:
    assert identity.code is not None
    device = DeviceName(identity.model, identity.mac)
    context = MicClientOptions(identity.mic_cert, identity.mic_key, identity.mic_chain)
    errors: list[str] = []
    for member in action.members:
        where = f"{member.address}:{member.port}"
        try:
            response = await tvs_client.activate(
                reactor,
                member.address,
                member.port,
                device=device,
                code=identity.code,
                pinned_der=action.pinned_der,
                timeout=options.timeout,
                context=context,
            )
        except tvs_client.PinMismatch:
            return Activated(
                None,
                where,
                f"{where} presented a certificate that is not the ITL's TVS certificate",
                untrusted=True,
            )
        except Exception as exc:
            errors.append(f"{where}: {_describe(exc)}")
            continue
        return Activated(response, where)
    return Activated(None, "", "no TVS server answered: " + "; ".join(errors))


def _user_agent(
    reactor: Any,
    identity: PhoneIdentity,
    config: DeviceConfig,
    options: BootOptions,
    server: CallManager | None = None,
    **extra: Any,
) -> Any:
    """The SIP user agent of ``config``'s lines at ``server`` (default: the config's first
    call manager), over its transport (TCP, or TLS with the MIC)."""
    from .sip_ua import SipUserAgent

    server = server or config.sip_server
    assert server is not None
    transport, port = _sip_endpoint(config, server)
    tls_options = None
    if transport == "tls":
        tls_options = MicClientOptions(identity.mic_cert, identity.mic_key, identity.mic_chain)
    return SipUserAgent(
        reactor,
        server.address,
        port,
        transport=transport,
        device_name=identity.sep_name,
        mac=identity.mac,
        model_id=identity.model_id,
        model=identity.model,
        lines=[(ln.name, ln.auth_name or ln.name, ln.auth_password) for ln in config.lines],
        load=config.load or identity.load,
        response_timeout=options.timeout,
        tls_options=tls_options,
        **extra,
    )


def _sip_endpoint(config: DeviceConfig, server: CallManager) -> tuple[str, int]:
    """The transport and port the UA uses at ``server`` (it speaks TCP and TLS)."""
    if config.transport == "tls":
        return "tls", server.secured_sip_port
    return "tcp", server.sip_port


async def _call_activation(
    reactor: Any, identity: PhoneIdentity, action: CallActivation, options: BootOptions
) -> VoiceActivated:
    """Register the bootstrap line, call the hotline's number, key the code (--ivr)."""
    from .ivr_call import activation_call
    from .sip_ua import SipRegistrationError

    if action.config.sip_server is None or identity.code is None:
        return VoiceActivated(False, "the bootstrap config names no SIP server")
    ua = _user_agent(reactor, identity, action.config, options, send_alarm=False)
    try:
        try:
            registered = await ua.register()
        except SipRegistrationError as exc:
            return VoiceActivated(False, f"bootstrap line REGISTER: {exc}")
        if not registered.ok:
            return VoiceActivated(False, f"bootstrap line REGISTER: {registered.status}")
        call = await activation_call(reactor, ua, action.number, identity.code,
                                     timeout=options.ivr_timeout)  # fmt: skip
        return VoiceActivated(call.ok, call.detail, call)
    finally:
        await ua.close()  # no unregister: the account is gone once the code is used


async def _register(
    reactor: Any, identity: PhoneIdentity, action: Register, options: BootOptions
) -> Registered:
    """REGISTER at the first call manager that answers, in priority order (failover).

    A node that refuses the connection, drops it or does not answer within the timeout is
    skipped; an answer, even a refusal, is final.
    """
    servers = action.config.sip_servers
    assert servers
    skipped: list[str] = []
    for server in servers:
        registered = await _register_at(reactor, identity, action, options, server)
        if skipped and isinstance(registered, Registered):
            registered = await _settle(reactor, identity, action, options, server, registered)
        if isinstance(registered, Registered):
            if skipped:
                registered = replace(
                    registered, detail=f"{registered.detail} (after {'; '.join(skipped)})"
                )
            return registered
        skipped.append(registered)
    return Registered(False, None, "no call manager answered: " + "; ".join(skipped))


async def _settle(
    reactor: Any,
    identity: PhoneIdentity,
    action: Register,
    options: BootOptions,
    server: CallManager,
    registered: Registered,
) -> Registered | str:
    """Retry a refusal (403/404) at the node fallen over to for ``failover_settle`` seconds:
    it may not have seen yet what the failed node wrote (the activation, a moment ago)."""
    deadline = time.monotonic() + options.failover_settle
    answer: Registered | str = registered
    while (
        isinstance(answer, Registered)
        and answer.status in (403, 404)
        and time.monotonic() < deadline
    ):
        await _sleep(reactor, 0.2)
        answer = await _register_at(reactor, identity, action, options, server)
    return answer


def _unanswered(exc: BaseException) -> bool:
    """The registrar never answered (connection refused, lost, or timed out)."""
    from .sip_ua import SipRegistrationError

    if not isinstance(exc, SipRegistrationError):
        return True
    return str(exc).startswith(("no response", "connection to the registrar lost"))


async def _register_at(
    reactor: Any,
    identity: PhoneIdentity,
    action: Register,
    options: BootOptions,
    server: CallManager,
) -> Registered | str:
    """REGISTER at ``server``: the result, or why it did not answer (try the next one)."""
    ua = _user_agent(
        reactor,
        identity,
        action.config,
        options,
        server,
        itl_signature=action.itl_signature,
        itl_tftp_server=action.itl_tftp_server,
    )
    transport, port = _sip_endpoint(action.config, server)
    where = f"{transport}:{server.address}:{port}"
    try:
        try:
            result = await ua.register()
        except Exception as exc:
            if _unanswered(exc):
                return f"{where}: {_describe(exc)}"
            return Registered(False, None, f"REGISTER to {where}: {exc}")
        dns = ", ".join(f"{ln.dn}={ln.status}" for ln in result.lines)
        detail = f"REGISTER to {where}: {dns}" + (" (x-cisco-newreg)" if result.newreg else "")
        if result.ok and options.unregister:
            await ua.unregister()
            detail += "; unregistered"
        return Registered(result.ok, result.status, detail)
    finally:
        await ua.close()


def boot_phone(
    reactor: Any,
    identity: PhoneIdentity,
    servers: Sequence[str],
    options: BootOptions | None = None,
    *,
    http: HttpFetcher | None = None,
    emit: Callable[[str], None] | None = None,
    observe: Callable[[Action, float], None] | None = None,
) -> defer.Deferred[BootResult]:
    """Boot one emulated phone against ``servers`` (option-150 order); never errbacks.

    Pass one shared :class:`HttpFetcher` when booting many phones; without it the phone makes
    its own and closes it at the end. The phone's HTTPS connection and TLS session are its own
    either way (kept between its fetches unless ``options.reuse_connections`` is off).
    ``emit`` receives each step line as it happens; ``observe`` each action performed and the
    seconds it took (a storm's per-step times).
    """
    opts = options or BootOptions()
    own_http = http is None
    fetcher_http = (
        http
        if http is not None
        else HttpFetcher(reactor, connect_timeout=opts.timeout, persistent=opts.reuse_connections)
    )
    secure = SecureSessions() if opts.reuse_connections else None
    fetcher = _Fetcher(reactor, servers, opts, fetcher_http, secure)
    started = time.monotonic()

    async def perform(action: Action) -> Feed:
        if observe is None:
            return await act(action)
        began = time.monotonic()
        try:
            return await act(action)
        finally:
            observe(action, time.monotonic() - began)

    async def act(action: Action) -> Feed:
        if isinstance(action, Fetch):
            if action.secure:
                return await fetcher.fetch_pinned(action)
            return await fetcher.fetch(action.name)
        if isinstance(action, Activate):
            return await _activate(reactor, identity, action, opts)
        if isinstance(action, Sleep):
            await _sleep(reactor, action.seconds)
            return Slept()
        if isinstance(action, CallActivation):
            return await _call_activation(reactor, identity, action, opts)
        return await _register(reactor, identity, action, opts)

    async def run() -> BootResult:
        try:
            result = await _drive(BootSequence(identity, opts, emit), perform)
        finally:
            if secure is not None:
                await secure.close()
            if own_http:
                await fetcher_http.close()
        return replace(result, elapsed=time.monotonic() - started)

    return defer.Deferred.fromCoroutine(run())


async def _drive(
    sequence: BootSequence, perform: Callable[[Action], Awaitable[Feed]]
) -> BootResult:
    """Run the sequence to its end, performing each action it asks for."""
    step = sequence.start()
    try:
        while not isinstance(step, BootResult):
            step = sequence.feed(await perform(step))
    except Exception as exc:  # a bug or an unexpected failure: still a result, not a crash
        sequence.note("fail", f"internal error: {type(exc).__name__}: {exc}")
        step = BootResult(
            Outcome.ERROR,
            f"internal error: {exc}",
            sequence.identity.sep_name,
            tuple(sequence.steps),
        )
    return step


async def _sleep(reactor: Any, seconds: float) -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d
