"""``callboard phone …``: boot one emulated phone (or a storm of them) from the command line.

The phone is a client; the ``callboard`` entry point lends it a subcommand. Each command runs
its own reactor with :func:`twisted.internet.task.react` and returns the boot's exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from callboard.protocols.models import normalise_mac
from callboard.protocols.tvs import labpki
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer, task

from .boot import BootOptions, BootResult, Outcome, PhoneIdentity, PrivateKey, normalise_model
from .driver import boot_phone
from .remote import remote_boot
from .storm import StormReport, read_bat_codes, run_storm, sequential_macs, storm_phones

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
        timeout=args.timeout,
        config_retries=args.config_retries,
        register=args.register,
        unregister=args.unregister,
        allow_tofu=args.tofu,
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
    outcome: list[BootResult] = []
    if not args.server and not args.activation_domain:
        print("callboard phone boot: give --server or --activation-domain", file=sys.stderr)
        return EXIT_USAGE

    async def main(reactor: Any) -> None:
        if args.activation_domain:
            result = await remote_boot(
                reactor, identity, args.activation_domain, timeout=args.timeout,
                register=args.register is not False, unregister=args.unregister, emit=_print,
            )  # fmt: skip
        else:
            result = await boot_phone(reactor, identity, args.server, _options(args), emit=_print)
        outcome.append(result)

    _react_exit(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    result = outcome[0]
    if not result.ok:
        print(f"callboard phone boot: {result.reason}", file=sys.stderr)
    return result.exit_code


def cmd_storm(args: argparse.Namespace) -> int:
    if not args.server:
        print("callboard phone storm: --server is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        codes = read_bat_codes(Path(args.codes).read_text(encoding="utf-8-sig"), args.model)
        issuer = labpki.load_issuing_ca(Path(args.lab_ca))
        count = args.count if args.count is not None else len(codes)
        if count > len(codes):
            raise ValueError(f"{args.codes} holds {len(codes)} BAT code(s) for {args.model}")
        macs = sequential_macs(args.first_mac, count)
    except (OSError, ValueError, labpki.CertError) as exc:
        print(f"callboard phone storm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    phones = storm_phones(issuer, args.model, macs, codes)
    print(f"storm: {len(phones)} phone(s) of model {args.model}, {args.concurrency} in flight")
    reports: list[StormReport] = []

    def show(result: BootResult) -> None:
        if not result.ok:
            print(f"  {result.device_name}: {result.reason}", flush=True)

    async def main(reactor: Any) -> None:
        report = await run_storm(
            reactor, phones, args.server, _options(args), concurrency=args.concurrency,
            on_result=show,
        )  # fmt: skip
        reports.append(report)

    _react_exit(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    report = reports[0]
    print(report.summary())
    return 0 if report.onboarded == report.phones else 1


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
        help="provisioning servers in DHCP option-150 order",
    )
    net.add_argument("--tftp-port", type=int, default=69)
    net.add_argument("--http-port", type=int, default=6970)
    net.add_argument(
        "--transport",
        choices=("auto", "http", "tftp"),
        default="auto",
        help="auto: HTTP first, then TFTP (as current Cisco firmware)",
    )
    net.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per network step (default 10)"
    )
    net.add_argument(
        "--config-retries", type=int, default=5, help="SEP config polls after activation"
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
    reg.add_argument("--no-register", dest="register", action="store_const", const=False)
    net.add_argument("--unregister", action="store_true", help="unregister after registering")
    net.add_argument(
        "--tofu",
        action="store_true",
        help="send the code to a TVS even without an ITL to pin it (labs only)",
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
    p.add_argument("--mac", required=True, type=_checked(normalise_mac))
    p.add_argument("--mic", required=True, help="the MIC certificate (PEM; chain may follow)")
    p.add_argument("--mic-key", required=True, help="the MIC private key (PEM)")
    p.add_argument("--code", help="the 16-digit activation code, as keyed in by a user")
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
        help="boot many phones at once (BAT codes from a CSV)",
        description="Boot N phones with sequential MACs against BAT codes exported by "
        "`callboard codes export`, MICs issued from a lab CA; report phones/s.",
    )
    p.add_argument("--model", required=True, help="the BAT devices' model, e.g. 8841")
    p.add_argument("--codes", required=True, help="CSV written by `callboard codes export`")
    p.add_argument("--lab-ca", required=True, help="directory made by `callboard certs lab-ca`")
    p.add_argument("--count", type=int, help="how many phones (default: one per code)")
    p.add_argument("--first-mac", default="0A0000000000", help="first MAC; the rest follow")
    p.add_argument("--concurrency", type=int, default=64, help="phones booting at once")
    p.set_defaults(func=cmd_storm)


def _checked(fn: Any) -> Any:
    def check(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    check.__name__ = fn.__name__
    return check
