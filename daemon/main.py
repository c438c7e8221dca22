"""``callboard``: argv → Config → service tree → reactor, the ``twist`` pattern.

``callboard serve`` runs the daemon; every other command is a short-lived client (admin
commands talk to the daemon's admin socket; ``certs`` works on files; ``phone`` runs the
emulated phone).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tomllib
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from . import inherited as socket_activation  # first: reads LISTEN_FDS before Twisted can
from .admin import cli as admin_cli
from .config import Config, ConfigError, load_config

EXIT_CONFIG = 2


def package_version() -> str:
    try:
        return version("callboard")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "0+unknown"


SERVE_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "--state-dir",
        "state_dir",
        {
            "metavar": "DIR",
            "help": "where the database, keys and sockets live (default /var/lib/callboard)",
        },
    ),
    (
        "--listen-address",
        "network.listen_addresses",
        {
            "action": "append",
            "metavar": "ADDRESS",
            "help": "an address to listen on (repeatable; default 127.0.0.1)",
        },
    ),
    (
        "--advertise-address",
        "network.advertise_address",
        {
            "metavar": "ADDRESS",
            "help": "the address written into phone configs (default the first listen address)",
        },
    ),
    (
        "--tftp-port",
        "network.tftp_port",
        {"type": int, "metavar": "PORT", "help": "TFTP, UDP (default 69)"},
    ),
    (
        "--http-port",
        "network.http_port",
        {"type": int, "metavar": "PORT", "help": "HTTP provisioning (default 6970)"},
    ),
    (
        "--tvs-port",
        "network.tvs_port",
        {"type": int, "metavar": "PORT", "help": "TVS, TLS (default 2445)"},
    ),
    (
        "--sip-port",
        "network.sip_port",
        {"type": int, "metavar": "PORT", "help": "SIP over UDP and TCP (default 5060)"},
    ),
    (
        "--sip-tls-port",
        "network.sip_tls_port",
        {"type": int, "metavar": "PORT", "help": "SIP over TLS (default 5061)"},
    ),
    (
        "--https-port",
        "network.https_port",
        {
            "type": int,
            "metavar": "PORT",
            "help": "HTTPS provisioning for ITL 1.1 phones (default 6971; 0 = off)",
        },
    ),
    (
        "--edge-port",
        "edge.port",
        {
            "type": int,
            "metavar": "PORT",
            "help": "HTTPS edge for remote activation, docs/REMOTE.md (off unless set)",
        },
    ),
    (
        "--sip-oauth-port",
        "edge.sip_oauth_port",
        {
            "type": int,
            "metavar": "PORT",
            "help": "the edge's SIP over TLS with bearer tokens (off unless set)",
        },
    ),
    (
        "--web-port",
        "network.web_port",
        {"type": int, "metavar": "PORT", "help": "HTTPS web console and REST API (off unless set)"},
    ),
    (
        "--tftp-root",
        "tftp_root",
        {"metavar": "DIR", "help": "firmware and other served files (default <state-dir>/tftp)"},
    ),
    (
        "--admin-socket",
        "admin_socket",
        {"metavar": "PATH", "help": "the admin API's UNIX socket (default <state-dir>/admin.sock)"},
    ),
    (
        "--manufacturing-trust",
        "tvs.manufacturing_trust",
        {
            "metavar": "DIR",
            "help": "directory of manufacturing root/intermediate PEM files "
            "(default <state-dir>/manufacturing-trust)",
        },
    ),
    (
        "--log-level",
        "log_level",
        {"choices": ["debug", "info", "warning", "error"], "help": "default info"},
    ),
    (
        "--log-format",
        "log_format",
        {"choices": ["json", "console"], "help": "JSON lines (default) or lines for humans"},
    ),
    (
        "--metrics-port",
        "metrics.port",
        {
            "type": int,
            "metavar": "PORT",
            "help": "serve Prometheus /metrics on this port (off unless set)",
        },
    ),
    (
        "--metrics-address",
        "metrics.address",
        {"metavar": "ADDRESS", "help": "the address /metrics listens on (default 127.0.0.1)"},
    ),
    (
        "--workers",
        "workers",
        {
            "type": int,
            "metavar": "N",
            "help": "reactor processes sharing every listener (default 1; 1-64)",
        },
    ),
    (
        "--registry",
        "registry.url",
        {
            "metavar": "URL",
            "help": "sqlite:///path (default <state-dir>/callboard.sqlite3) "
            "or postgresql://user@host/db",
        },
    ),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; for ``command`` ``serve`` only what the daemon parses, so a
    daemon does not import the clients' modules (the emulated phone) it never runs."""
    parser = argparse.ArgumentParser(
        prog="callboard",
        description="Onboard IP phones with activation codes: provisioning, TVS and registrar.",
    )
    parser.add_argument("--version", action="version", version=f"callboard {package_version()}")
    parser.add_argument(
        "--admin-socket",
        dest="admin_socket",
        metavar="PATH",
        help="the daemon's admin socket (else $CALLBOARD_ADMIN_SOCKET, "
        "else <state-dir>/admin.sock)",
    )
    parser.add_argument(
        "--state-dir",
        dest="state_dir",
        metavar="DIR",
        help="the daemon's state directory, to find its admin socket",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon", description="Run the daemon.")
    serve.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML configuration file (none by default)"
    )
    for flag, key, extra in SERVE_FLAGS:
        serve.add_argument(flag, dest="serve." + key, default=None, **extra)
    serve.add_argument(
        "--demo",
        dest="serve.demo",
        action="store_const",
        const=True,
        default=None,
        help="provision a demo phone when the registry is empty "
        "and print its activation code (never in production)",
    )
    serve.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any configuration key, e.g. "
        "--set tftp.max_blksize=8192 or --set 'sip.digest_algorithms=[\"MD5\"]' "
        "(the value is TOML; a bare word is a string)",
    )
    serve.set_defaults(func=run_serve)

    if command != "serve":
        admin_cli.register_cli(sub)
        _register_optional(sub)
    return parser


_GLOBAL_VALUE_OPTIONS = ("--admin-socket", "--state-dir")


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not a global option)."""
    words = iter(argv)
    for word in words:
        if _takes_value(word):
            next(words, None)  # the option's value
        elif not word.startswith("-"):
            return word
    return None


def _takes_value(word: str) -> bool:
    """A global option whose value is the next word, spelt out or abbreviated as argparse
    accepts (``--state DIR``); not ``--state-dir=DIR``."""
    return (
        "=" not in word
        and len(word) > 2
        and any(option.startswith(word) for option in _GLOBAL_VALUE_OPTIONS)
    )


def _register_optional(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Commands from other modules: certificate tooling and the emulated phone."""
    from . import certs

    certs.register_cli(sub)

    from .registry import engines

    engines.register_cli(sub)

    # The emulated phone is a client, not part of the daemon: the one entry point lends it a
    # subcommand. Imported here rather than at the top so no daemon module depends on it.
    from callboard.phone import cli as phone_cli

    phone_cli.register_cli(sub)


def parse_setting(text: str) -> tuple[str, Any]:
    """``tftp.max_blksize=8192`` → (key, 8192): the value is TOML, a bare word a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def serve_config(args: argparse.Namespace) -> Config:
    overrides = dict(parse_setting(text) for text in args.settings)
    # `callboard --state-dir DIR serve` means the same as `callboard serve --state-dir DIR`.
    for name in ("state_dir", "admin_socket"):
        if getattr(args, name, None):
            overrides[name] = getattr(args, name)
    overrides.update(
        (key.removeprefix("serve."), value)
        for key, value in vars(args).items()
        if key.startswith("serve.") and value is not None
    )
    return load_config(args.config, overrides)


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = serve_config(args)
    except ConfigError as exc:
        print(f"callboard serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from .serve import start_checks
    from .workers import plan_from_environ

    plan = plan_from_environ()
    if plan is not None:  # one of the workers of `serve --workers N` (its supervisor checked)
        from .workers import run_worker

        return run_worker(config, plan, reload_config=lambda: serve_config(args))
    inherited = getattr(args, "inherited", None) or socket_activation.InheritedSockets()
    checked = start_checks(config, inherited)
    if isinstance(checked, int):
        return checked
    from .runner import run_daemon

    try:
        if config.workers > 1:
            from .supervisor import run_supervisor

            return run_supervisor(config, getattr(args, "argv", ["serve"]), inherited)
        return run_daemon(config, inherited=inherited, reload_config=lambda: serve_config(args))
    finally:
        checked.release()


def main(argv: Sequence[str] | None = None) -> int:
    # Socket activation's variables, read before anything imports twisted.internet.endpoints
    # (building the parser does), which would remove them.
    inherited = socket_activation.capture()
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_of(words))
    args = parser.parse_args(words)
    args.inherited = inherited
    args.argv = words  # workers run the same command
    if args.command != "serve":
        # Short-lived clients die quietly when piped into `head`; the daemon must not.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
