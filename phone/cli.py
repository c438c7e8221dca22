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
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer, task

from .boot import (
    BootOptions,
    BootResult,
    Outcome,
    PhoneIdentity,
    PrivateKey,
    boot_phone,
    normalise_model,
)

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

    async def main(reactor: Any) -> None:
        result = await boot_phone(reactor, identity, args.server, _options(args), emit=_print)
        outcome.append(result)

    _react_exit(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    result = outcome[0]
    if not result.ok:
        print(f"callboard phone boot: {result.reason}", file=sys.stderr)
    return result.exit_code


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

    net = argparse.ArgumentParser(add_help=False)
    net.add_argument(
        "--server",
        required=True,
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
    p.set_defaults(func=cmd_boot)

    from . import storm

    storm.register_cli(sub, net)


def _checked(fn: Any) -> Any:
    def check(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    check.__name__ = fn.__name__
    return check
