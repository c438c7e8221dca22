"""``callboard phone …``: boot one emulated phone (or a storm of them) from the command line.

The phone is a client; the ``callboard`` entry point lends it a subcommand. Each command runs
its own reactor with :func:`twisted.internet.task.react` and returns the boot's exit code.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from callboard.protocols.models import normalise_mac
from callboard.protocols.tvs import labpki
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer, task

from .boot import BootOptions, BootResult, Outcome, PhoneIdentity, PrivateKey, normalise_model
from .driver import boot_phone
from .provision import ProvisionError, provision_bat
from .remote import remote_boot
from .storm import MicCache, default_mic_cache, read_bat_codes, sequential_macs
from .storm_run import PhoneSpec, Progress, StormSpec, storm_in_process, storm_in_processes

EXIT_USAGE = 2

EXIT_CODES_HELP = "exit codes: " + ", ".join(f"{o.value} {o.name.lower()}" for o in Outcome)


class UsageError(Exception):
    """Bad input files or values, reported in one line (exit 2)."""


def load_mic(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, PrivateKey, tuple[x509.Certificate, ...]]:
    """The MIC (first certificate in the PEM), any chain after it, and its private key."""
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load MIC certificate {cert_path}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot load MIC key {key_path}: {type(exc).__name__}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise UsageError(f"{key_path}: only RSA and EC keys are supported")
    return certs[0], key, tuple(certs[1:])


def _servers(text: str) -> list[str]:
    servers = [s.strip() for s in text.split(",") if s.strip()]
    if not servers:
        raise argparse.ArgumentTypeError("give at least one server address")
    return servers


def _options(args: argparse.Namespace) -> BootOptions:
    return BootOptions(
        transport=args.transport,
        tftp_port=args.tftp_port,
        http_port=args.http_port,
        https_port=args.https_port,
        timeout=args.timeout,
        config_retries=args.config_retries,
        register=args.register,
        unregister=args.unregister,
        allow_tofu=args.tofu,
        ivr=args.ivr,
        reuse_connections=args.reuse_connections,
    )


def _print(line: str) -> None:
    print(line, flush=True)


def cmd_boot(args: argparse.Namespace) -> int:
    try:
        cert, key, chain = load_mic(Path(args.mic), Path(args.mic_key))
        identity = PhoneIdentity(
            mac=args.mac, model=args.model, mic_cert=cert, mic_key=key, code=args.code,
            mic_chain=chain,
        )  # fmt: skip
    except (UsageError, ValueError) as exc:
        print(f"callboard phone boot: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.server and not args.dhcp and not args.activation_domain:
        print(
            "callboard phone boot: give --server, --dhcp IFACE or --activation-domain",
            file=sys.stderr,
        )
        return EXIT_USAGE
    outcome: list[BootResult] = []
    failed: list[str] = []

    async def main(reactor: Any) -> None:
        if args.activation_domain:
            result = await remote_boot(
                reactor, identity, args.activation_domain, timeout=args.timeout,
                register=args.register is not False, unregister=args.unregister, emit=_print,
            )  # fmt: skip
            outcome.append(result)
            return
        servers = args.server
        if args.dhcp:
            servers = await _servers_from_dhcp(reactor, args, failed)
            if not servers:
                return
        result = await boot_phone(reactor, identity, servers, _options(args), emit=_print)
        outcome.append(result)

    _react_exit(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    if failed:
        print(f"callboard phone boot: {failed[0]}", file=sys.stderr)
        return Outcome.UNREACHABLE.value
    result = outcome[0]
    if not result.ok:
        print(f"callboard phone boot: {result.reason}", file=sys.stderr)
    return result.exit_code


async def _servers_from_dhcp(
    reactor: Any, args: argparse.Namespace, failed: list[str]
) -> list[str]:
    """Option 150's addresses in order, else option 66's name: what a phone boots from."""
    from .dhcp import request_lease

    try:
        lease = await request_lease(
            reactor,
            args.dhcp,
            args.mac,
            timeout=args.timeout * 3,
            retransmit=min(2.0, args.timeout / 4),
            vendor_class=f"Cisco Systems, Inc. IP Phone CP-{args.model}",
        )
    except defer.TimeoutError:
        failed.append(f"no DHCP lease on {args.dhcp}")
        return []
    except (OSError, ValueError) as exc:
        failed.append(f"DHCP on {args.dhcp}: {exc}")
        return []
    servers = list(lease.provisioning_servers)
    _print(
        f"[dhcp] lease {lease.address} from {lease.server_id}: option 150 "
        f"{','.join(lease.tftp_servers) or '-'}, option 66 {lease.tftp_server_name or '-'}"
    )
    if not servers:
        failed.append(f"the DHCP lease on {args.dhcp} names no TFTP server (options 150, 66)")
    return servers


MAX_STORM_PHONES = 100_000


def cmd_storm(args: argparse.Namespace) -> int:
    """A whole storm in one command: provision (or read codes), MICs, boot, report."""
    if not args.server and not args.activation_domain:
        print("callboard phone storm: give --server or --activation-domain", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_storm_targets(args.server or [_edge_host(args.activation_domain)])
        if not 1 <= args.processes <= 64:
            raise ValueError("--processes must be 1..64")
        if args.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if args.count is not None and not 1 <= args.count <= MAX_STORM_PHONES:
            raise ValueError(f"--count must be 1..{MAX_STORM_PHONES}")
        issuer = labpki.load_issuing_ca(Path(args.lab_ca))
        model = normalise_model(args.model)
        codes = _storm_codes(args, model)
        count = args.count if args.count is not None else len(codes)
        if count > len(codes):
            raise ValueError(f"{args.codes} holds {len(codes)} BAT code(s) for {args.model}")
        count = min(count, MAX_STORM_PHONES)
        macs = sequential_macs(args.first_mac, count)
        cache = MicCache(Path(args.mic_cache) if args.mic_cache else default_mic_cache(), issuer)
        phones = [
            PhoneSpec(str(cache.ensure(model, mac)), mac, model, code)
            for mac, code in zip(macs, codes, strict=False)
        ]
    except (OSError, ValueError, labpki.CertError, ProvisionError) as exc:
        print(f"callboard phone storm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"storm: {len(phones)} phone(s) of model {model}, {args.concurrency} in flight, "
        f"{args.processes} process(es); MICs: {cache.issued} issued, {cache.reused} reused "
        f"from {cache.directory}",
        flush=True,
    )
    spec = StormSpec(
        tuple(args.server or ()), _options(args), args.concurrency, args.time_limit,
        activation_domain=args.activation_domain,
    )  # fmt: skip
    progress = Progress(len(phones), sys.stdout)
    try:
        if args.processes == 1:
            report = storm_in_process(phones, spec, progress.update)
        else:
            report = storm_in_processes(phones, spec, args.processes, progress.update)
    except (OSError, ValueError, RuntimeError) as exc:
        progress.close()
        print(f"callboard phone storm: {exc}", file=sys.stderr)
        return 1
    progress.update(report.phones, report.phones - report.onboarded, force=True)
    progress.close()
    for line in report.report_lines():
        print(line)
    return 0 if report.phones and report.onboarded == report.phones else 1


def _storm_codes(args: argparse.Namespace, model: str) -> list[str]:
    """The codes to boot with: provisioned now through the admin API, or read from a CSV."""
    if args.provision:
        if args.count is None:
            raise ValueError("--provision needs --count")
        socket_path = _admin_socket(args)
        started = time.monotonic()
        remote = bool(args.activation_domain)  # the devices must allow remote activation
        codes = provision_bat(socket_path, model=model, count=args.count, allow_remote=remote)
        print(
            f"storm: {len(codes)} BAT device(s) added through {socket_path} "
            f"in {time.monotonic() - started:.2f} s",
            flush=True,
        )
        return codes
    return read_bat_codes(Path(args.codes).read_text(encoding="utf-8-sig"), model)


def _edge_host(origin: str) -> str:
    """The host of ``--activation-domain https://HOST:PORT`` (:class:`ValueError` if none)."""
    parts = urlsplit(origin)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"--activation-domain {origin!r}: expected https://HOST:PORT")
    return parts.hostname


def _admin_socket(args: argparse.Namespace) -> Path:
    """``--admin-socket`` (here or before ``phone``), else $CALLBOARD_ADMIN_SOCKET, else
    ``<state-dir>/admin.sock`` (default state dir /var/lib/callboard)."""
    given = args.storm_admin_socket or getattr(args, "admin_socket", None)
    if given:
        return Path(given)
    env = os.environ.get("CALLBOARD_ADMIN_SOCKET")
    if env:
        return Path(env)
    return Path(getattr(args, "state_dir", None) or "/var/lib/callboard") / "admin.sock"


def check_storm_targets(servers: list[str]) -> None:
    """A storm is a load test: loopback only, or any address inside a network namespace
    (where it cannot reach a production network). :class:`ValueError` otherwise."""
    inside_namespace = _in_network_namespace()
    for server in servers:
        try:
            infos = socket.getaddrinfo(server, None, proto=socket.IPPROTO_UDP)
        except OSError as exc:
            raise ValueError(f"cannot resolve {server}: {exc}") from None
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if not address.is_loopback and not inside_namespace:
                raise ValueError(
                    f"refusing to storm {server} ({address}): a storm runs against loopback "
                    "or inside a network namespace only"
                )


def _in_network_namespace() -> bool:
    """True when this process's network namespace is not the init process's."""
    try:
        return os.readlink("/proc/self/ns/net") != os.readlink("/proc/1/ns/net")
    except OSError:
        return False


def _react_exit(run: Any) -> int:
    """``task.react`` ends with SystemExit; turn that back into a return value."""
    try:
        task.react(run, [])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``phone boot`` and ``phone storm``; each parser sets ``func(args) -> int``."""
    phone = subparsers.add_parser(
        "phone",
        help="an emulated Cisco phone (a test client of this or any Callboard)",
        description="Emulated Cisco IP phones that boot, activate and register like hardware.",
    )
    sub = phone.add_subparsers(dest="phone_command", required=True, metavar="COMMAND")

    net = _network_arguments()
    _add_boot(sub, net)
    _add_storm(sub, net)


def _network_arguments() -> argparse.ArgumentParser:
    """The options every phone command shares: servers, ports, transport, timing, SIP."""
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument(
        "--server",
        type=_servers,
        metavar="ADDR[,ADDR…]",
        help="provisioning servers, in DHCP option-150 order",
    )
    net.add_argument("--tftp-port", type=int, default=69, metavar="PORT", help="TFTP (default 69)")
    net.add_argument(
        "--http-port", type=int, default=6970, metavar="PORT", help="HTTP (default 6970)"
    )
    net.add_argument(
        "--https-port",
        type=int,
        default=6971,
        metavar="PORT",
        help="HTTPS for SEP<MAC>.cnf.xml when the ITL is version 1.1 (default 6971; 0 = never)",
    )
    net.add_argument(
        "--transport",
        choices=("auto", "http", "tftp"),
        default="auto",
        help="auto: HTTP first, then TFTP (as current Cisco firmware)",
    )
    net.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds per network step (default 10)",
    )
    net.add_argument(
        "--config-retries",
        type=int,
        default=5,
        metavar="N",
        help="SEP config polls after activation (default 5)",
    )
    reg = net.add_mutually_exclusive_group()
    reg.add_argument(
        "--register",
        dest="register",
        action="store_const",
        const=True,
        default=None,
        help="REGISTER the lines (default: when the config names a SIP server)",
    )
    reg.add_argument(
        "--no-register",
        dest="register",
        action="store_const",
        const=False,
        help="stop once configured (activated if needed)",
    )
    net.add_argument("--unregister", action="store_true", help="unregister after registering")
    net.add_argument(
        "--no-reuse",
        dest="reuse_connections",
        action="store_false",
        help="a new connection and a full TLS handshake for every HTTP(S) fetch (default: "
        "keep-alive, and HTTPS kept open or its TLS session resumed, as a real phone)",
    )
    net.add_argument(
        "--tofu",
        action="store_true",
        help="send the code to a TVS even without an ITL to pin it (labs only)",
    )
    net.add_argument(
        "--ivr",
        action="store_true",
        help="activate by voice when the server answers with a bootstrap config: register "
        "its account, call the hotline's number, key the code as RFC 4733 events",
    )
    return net


def _add_boot(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], net: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "boot",
        parents=[net],
        help="boot one phone",
        description="Boot one emulated phone: trust list, config, activation, REGISTER.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--model", required=True, type=_checked(normalise_model), help="e.g. 8841")
    p.add_argument("--mac", required=True, type=_checked(normalise_mac), help="12 hex digits")
    p.add_argument(
        "--mic",
        required=True,
        metavar="PEM",
        help="the MIC certificate (PEM; chain may follow)",
    )
    p.add_argument("--mic-key", required=True, metavar="PEM", help="the MIC private key (PEM)")
    p.add_argument(
        "--code",
        metavar="CODE",
        help="the 16-digit activation code, as keyed in by a user (dashes allowed)",
    )
    p.add_argument(
        "--dhcp",
        metavar="IFACE",
        help="learn the servers from DHCP on IFACE (option 150 in order, option 66 as the "
        "fallback) instead of --server; needs root",
    )
    p.add_argument(
        "--activation-domain",
        metavar="https://HOST:PORT",
        help="activate remotely at this Callboard edge (OAuth with the MIC, docs/REMOTE.md) "
        "instead of DHCP/TFTP/TVS; --server is then not needed",
    )
    p.set_defaults(func=cmd_boot)


def _add_storm(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], net: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "storm",
        parents=[net],
        help="boot many phones at once (provisioned now, or BAT codes from a CSV)",
        description="Boot N phones with sequential MACs against BAT codes (added now through "
        "the admin API with --provision, or exported by `callboard codes export`), MICs "
        "issued from a lab CA and cached by MAC; report phones/s and per-step times. "
        "Loopback (or a network namespace) only. Exit 0 only when every phone onboarded.",
    )
    p.add_argument("--model", required=True, help="the BAT devices' model, e.g. 8841")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--codes", metavar="FILE", help="CSV written by `callboard codes export`")
    source.add_argument(
        "--provision",
        action="store_true",
        help="add --count BAT devices through the admin API (one bulk import) and use their "
        "codes; nothing is removed afterwards",
    )
    p.add_argument(
        "--admin-socket",
        dest="storm_admin_socket",
        metavar="PATH",
        help="with --provision: the daemon's admin socket (else $CALLBOARD_ADMIN_SOCKET, "
        "else <state-dir>/admin.sock of `callboard --state-dir DIR`, else "
        "/var/lib/callboard/admin.sock)",
    )
    p.add_argument(
        "--lab-ca",
        required=True,
        metavar="DIR",
        help="directory made by `callboard certs lab-ca`",
    )
    p.add_argument(
        "--count",
        type=int,
        metavar="N",
        help=f"how many phones, at most {MAX_STORM_PHONES} (default: one per code)",
    )
    p.add_argument(
        "--first-mac",
        default="0A0000000000",
        metavar="MAC",
        help="first MAC; the rest follow (default 0A0000000000)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=64,
        metavar="N",
        help="phones booting at once (default 64)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="client processes to spread the phones over (default 1)",
    )
    p.add_argument(
        "--mic-cache",
        metavar="DIR",
        help="where issued MICs are kept by MAC (default ~/.cache/callboard/storm-mics)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="seconds after which phones not yet started are not booted (default 3600)",
    )
    p.add_argument(
        "--activation-domain",
        metavar="https://HOST:PORT",
        help="activate every phone remotely at this Callboard edge (as `phone boot "
        "--activation-domain`) instead of DHCP/TFTP/TVS; --server is then not needed; "
        "--provision then lets each new device activate remotely",
    )
    p.set_defaults(func=cmd_storm)


def _checked(fn: Any) -> Any:
    def check(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    check.__name__ = fn.__name__
    return check
