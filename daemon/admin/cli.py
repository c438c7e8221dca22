"""The admin commands of the ``callboard`` CLI: a client of the daemon's admin API.

Each command prints a readable table by default and JSON with ``--json``; on failure it
prints one line saying why on stderr and exits non-zero.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from ..config import DEFAULT_STATE_DIR
from .csvio import CSVFormatError, read_import_rows, write_codes_csv

EXIT_FAILURE = 1
EXIT_USAGE = 2


class CLIError(Exception):
    """A failure to report in one line (and, for an import, the bad rows)."""

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AdminClient:
    """Synchronous JSON calls to the admin socket (the CLI needs no reactor)."""

    def __init__(self, socket_path: Path, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        conn = _UnixHTTPConnection(str(self.socket_path), self.timeout)
        headers = {"Content-Type": "application/json", "X-Callboard-User": _whoami()}
        payload = json.dumps(body).encode() if body is not None else None
        try:
            conn.request(method, "/v1/" + path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except FileNotFoundError:
            raise CLIError(
                f"no admin socket at {self.socket_path}: is the daemon running? "
                "(set --admin-socket or CALLBOARD_ADMIN_SOCKET)"
            ) from None
        except PermissionError:
            raise CLIError(f"permission denied on {self.socket_path}") from None
        except (ConnectionError, OSError) as exc:
            raise CLIError(f"cannot reach the daemon at {self.socket_path}: {exc}") from None
        finally:
            conn.close()
        try:
            result = json.loads(raw) if raw else None
        except ValueError:
            raise CLIError(f"the daemon answered {response.status} with non-JSON") from None
        if response.status >= 400:
            body = result if isinstance(result, dict) else {}
            raise CLIError(
                (
                    body.get("error")
                    or body.get("detail")
                    or f"the daemon answered {response.status}"
                )
                + _what_was_wrong(body.get("errors")),
                body.get("problems", []),
            )
        return result


def _what_was_wrong(errors: Any) -> str:
    """The fields a refused request got wrong, as the problem lists them (``at``: where,
    ``message``: what), for the one line the CLI prints; '' when it lists none."""
    if not isinstance(errors, list):
        return ""
    said = [f"{e.get('at', '?')}: {e.get('message', '?')}" for e in errors if isinstance(e, dict)]
    return f" ({'; '.join(said)})" if said else ""


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def admin_socket_path(args: argparse.Namespace) -> Path:
    """``--admin-socket``, else ``CALLBOARD_ADMIN_SOCKET``, else ``<state-dir>/admin.sock``."""
    if args.admin_socket:
        return Path(args.admin_socket)
    env = os.environ.get("CALLBOARD_ADMIN_SOCKET")
    if env:
        return Path(env)
    return Path(args.state_dir or DEFAULT_STATE_DIR) / "admin.sock"


# -- output ---------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_text(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) or "-"
    return str(value)


def _device_rows(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for d in devices:
        code = d.get("activation_code") or {}
        rows.append(
            {
                **d,
                "lines": [ln["directory_number"] for ln in d.get("lines", [])],
                "code": code.get("state"),
                "registered": len(d.get("registrations", []) or []) or None,
            }
        )
    return rows


def _show_device(d: dict[str, Any]) -> str:
    code = d.get("activation_code") or {}
    out = [
        f"name:                {d['name']}",
        f"model:               {d['model']}",
        f"state:               {d['state']}",
        f"requires activation: {_text(d['requires_activation'])}",
        f"allow remote:        {_text(d.get('allow_remote', False))}",
        f"description:         {d.get('description') or '-'}",
        f"user:                {d.get('user') or '-'}",
    ]
    if "onboarding" in d:
        out.append(f"onboarding:          {d['onboarding']} ({d.get('onboarding_source', '-')})")
    if "bootstrap" in d:
        out.append(f"bootstrap:           {d['bootstrap']}")
    for key in ("bound_to", "created", "updated", "activated", "mic_sha256"):
        if key in d:
            out.append(f"{key.replace('_', ' ') + ':':21}{_text(d[key])}")
    if code:
        shown = code.get("code", "(hidden: use 'callboard code show')")
        out.append(f"activation code:     {shown} ({code['state']}, expires {code['expires']})")
    for ln in d.get("lines", []):
        out.append(
            f"line:                {ln['directory_number']} {ln.get('display_name') or ''}"
            f" (auth {ln.get('auth_name') or '-'}"
            f"{', password set' if ln.get('has_password') else ''})"
        )
    regs = d.get("registrations")
    if regs is not None:
        if not regs:
            out.append("registrations:       none")
        for r in regs:
            out.append(
                "registration:        "
                + " ".join(f"{k}={_text(v)}" for k, v in r.items() if v not in (None, ""))
            )
    return "\n".join(out)


# -- commands -----------------------------------------------------------------------------


def _parse_line(spec: str) -> dict[str, str]:
    dn, _, display = spec.partition(":")
    return {"directory_number": dn, "display_name": display}


def cmd_device_add(client: AdminClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {
        "model": args.model,
        "mac": args.mac,
        "description": args.description,
        "user": args.user,
        "lines": [_parse_line(spec) for spec in args.line],
        "requires_activation": args.require_activation,
        "allow_remote": args.allow_remote,
    }
    if args.onboarding is not None:
        body["onboarding"] = args.onboarding
    for line in body["lines"]:
        if args.password:
            line["auth_password"] = args.password
        if args.auth_name:
            line["auth_name"] = args.auth_name
    return client.call("POST", "devices", body)


def cmd_device_edit(client: AdminClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    if args.description is not None:
        body["description"] = args.description
    if args.user is not None:
        body["user"] = args.user
    if args.line is not None:
        body["lines"] = [_parse_line(spec) for spec in args.line]
        for line in body["lines"]:
            if args.password:
                line["auth_password"] = args.password
    elif args.password:
        raise CLIError("--password goes with --line (the lines it is for)")
    if not body:
        raise CLIError("give --description, --user or --line")
    result = client.call("PATCH", f"devices/{args.name}", body)
    code = result.get("activation_code") if isinstance(result, dict) else None
    if isinstance(code, dict) and code.get("code") is None:
        code.pop("code", None)
    return result


def cmd_device_list(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("GET", "devices")


def cmd_device_show(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("GET", f"devices/{args.name}")


def cmd_device_set_mac(client: AdminClient, args: argparse.Namespace) -> Any:
    if args.blank == bool(args.mac):
        raise CLIError("give a MAC address or --blank")
    return client.call(
        "POST", f"devices/{args.name}/mac", {"mac": None if args.blank else args.mac}
    )


def cmd_device_delete(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("DELETE", f"devices/{args.name}")


def cmd_device_require(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call(
        "POST", f"devices/{args.name}/require-activation", {"required": not args.off}
    )


def cmd_device_set(client: AdminClient, args: argparse.Namespace) -> Any:
    if args.allow_remote is None:
        raise CLIError("nothing to set: give --allow-remote or --no-allow-remote")
    return client.call("POST", f"devices/{args.name}/allow-remote", {"allowed": args.allow_remote})


def cmd_device_revoke_tokens(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("POST", f"devices/{args.name}/revoke-tokens")


def cmd_code_show(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("GET", f"devices/{args.name}/code")


def cmd_code_release(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("POST", f"devices/{args.name}/code/release")


def cmd_code_generate(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("POST", f"devices/{args.name}/code/generate")


def cmd_codes_export(client: AdminClient, args: argparse.Namespace) -> Any:
    rows = client.call("GET", "codes")
    text = write_codes_csv(rows)
    target = Path(args.file)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
    except OSError as exc:
        raise CLIError(f"cannot write {target}: {exc.strerror}") from None
    return {"exported": len(rows), "file": str(target)}


def cmd_import(client: AdminClient, args: argparse.Namespace) -> Any:
    try:
        text = Path(args.file).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CLIError(f"cannot read {args.file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CLIError(f"{args.file} is not UTF-8 text") from None
    try:
        rows = read_import_rows(text)
    except CSVFormatError as exc:
        raise CLIError(f"{args.file}: {exc}") from None
    body = {"rows": [{"line": r.line, "cells": r.cells} for r in rows], "dummy_mac": args.dummy_mac}
    try:
        return client.call("POST", "import", body)
    except CLIError as exc:
        for p in exc.problems:
            print(f"{args.file}: line {p['line']}: {p['message']}", file=sys.stderr)
        raise


def cmd_status(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("GET", "status")


def cmd_backup(client: AdminClient, args: argparse.Namespace) -> Any:
    # The daemon writes the file (as its own user), so it gets an absolute path.
    return client.call("POST", "backup", {"file": os.path.abspath(args.file)})


def cmd_defaults_show(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("GET", "defaults")


def cmd_defaults_set(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("PUT", f"defaults/{args.model}", {"onboarding": args.onboarding})


# -- users, API tokens, codes by email (the web front door's accounts) -----------------------


def _read_password(args: argparse.Namespace) -> str | None:
    """One line from stdin with ``--password-stdin`` (never from argv, where ps shows it)."""
    if not args.password_stdin:
        return None
    line = sys.stdin.readline()
    if not line:
        raise CLIError("--password-stdin: no line on standard input")
    return line.rstrip("\r\n")


def cmd_user_add(client: AdminClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {
        "name": args.user,
        "admin": args.admin,
        "email": args.email,
        "display_name": args.name,
    }
    password = _read_password(args)
    if password is not None:
        body["password"] = password
    return client.call("POST", "users", body)


def cmd_user_set_password(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call(
        "PUT", f"users/{args.user}/password", {"password": _read_password(args) or ""}
    )


def cmd_user_list(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("GET", "users")


def cmd_user_delete(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("DELETE", f"users/{args.user}" + ("?force=true" if args.force else ""))


def cmd_token_create(client: AdminClient, args: argparse.Namespace) -> Any:
    body = {"name": args.token, "read_only": args.read_only, "user": args.user}
    return client.call("POST", "tokens", body)


def cmd_token_list(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("GET", "tokens")


def cmd_token_revoke(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("DELETE", f"tokens/{args.token}")


def cmd_code_send(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.call("POST", f"devices/{args.name}/code/send")


def _render_accounts(command: str, result: Any) -> str | None:
    if command == "user list":
        return _table(result, ["name", "display_name", "email", "admin", "devices"])
    if command in ("user add", "user set-password", "user delete"):
        verb = {"user add": "added", "user set-password": "password set for",
                "user delete": "deleted"}[command]  # fmt: skip
        return f"{verb} user {result['name']}"
    if command == "token create":
        return f"token {result['name']} (shown once, keep it safe):\n{result['token']}"
    if command == "token list":
        return _table(result, ["name", "read_only", "user", "created_by", "created"])
    if command == "token revoke":
        return f"revoked token {result['name']}"
    if command == "code send":
        return f"sent the code of {result['device']} to {result['to']}"
    return None


def register_accounts_cli(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    output: argparse.ArgumentParser,
) -> None:
    def leaf(parent: Any, name: str, func: Any, command: str, help: str) -> Any:
        parser = parent.add_parser(name, parents=[output], help=help, description=help)
        parser.set_defaults(func=_run_admin, admin_func=func, command=command)
        return parser

    user = sub.add_parser("user", help="web users (Self-Care, admin console)").add_subparsers(
        dest="user_command", required=True, metavar="COMMAND"
    )
    p = leaf(user, "add", cmd_user_add, "user add", "add a user")
    p.add_argument("user")
    p.add_argument("--admin", action="store_true", help="may use the admin console and API")
    p.add_argument("--email", default="", help="where `code send` mails the code")
    p.add_argument("--name", default="", help="display name")
    p.add_argument("--password-stdin", action="store_true", help="read the password (one line)")
    p = leaf(user, "set-password", cmd_user_set_password, "user set-password", "set a password")
    p.add_argument("user")
    p.add_argument("--password-stdin", action="store_true", required=True)
    leaf(user, "list", cmd_user_list, "user list", "list users")
    p = leaf(user, "delete", cmd_user_delete, "user delete", "delete a user")
    p.add_argument("user")
    p.add_argument("--force", action="store_true", help="even if they own devices")

    token = sub.add_parser("token", help="REST API bearer tokens").add_subparsers(
        dest="token_command", required=True, metavar="COMMAND"
    )
    p = leaf(token, "create", cmd_token_create, "token create", "create a token (printed once)")
    p.add_argument("token", metavar="NAME")
    p.add_argument("--read-only", action="store_true", help="reads only, never codes")
    p.add_argument("--user", default="", help="act as this user instead of as an admin")
    leaf(token, "list", cmd_token_list, "token list", "list tokens")
    leaf(token, "revoke", cmd_token_revoke, "token revoke", "revoke a token").add_argument(
        "token", metavar="NAME"
    )


def _render(command: str, result: Any) -> str:
    accounts = _render_accounts(command, result)
    if accounts is not None:
        return accounts
    if command in ("device list",):
        cols = ["name", "model", "state", "lines", "user", "code", "description"]
        return _table(_device_rows(result), cols)
    if command in (
        "device show",
        "device add",
        "device edit",
        "device set-mac",
        "device delete",
        "device require-activation",
        "device set",
        "device revoke-tokens",
    ):
        return _show_device(result)
    if command in ("code show", "code generate", "code release"):
        return _table([result], [k for k in ("device", "code", "state", "expires") if k in result])
    if command == "status":
        rows = [
            {"listener": label, "address": place}
            for label, places in result.items()
            if isinstance(places, list) and label not in ("warnings", "workers")
            for place in places
        ]
        counters = result.get("counters", {})
        live = ", ".join(f"{k}={v}" for k, v in counters.items() if v)
        warnings = "".join(f"\nwarning: {w}" for w in result.get("warnings", []))
        return (
            _status_summary(result)
            + _table(rows, ["listener", "address"])
            + _workers_table(result.get("workers"))
            + (f"\ncounters: {live}" if live else "")
            + warnings
        )
    if command == "backup":
        return f"wrote a copy of the registry ({result['devices']} device(s)) to {result['file']}"
    if command == "defaults show":
        return _table(result, ["model", "model_id", "onboarding"])
    if command == "defaults set":
        return f"{result['model']}: {result['onboarding']}"
    if command == "codes export":
        return f"wrote {result['exported']} outstanding code(s) to {result['file']}"
    if command == "import":
        return f"imported {result['imported']} device(s)"
    return json.dumps(result, indent=2)


def _status_summary(result: dict[str, Any]) -> str:
    by_state = result.get("devices_by_state") or {}
    states = ", ".join(f"{state} {n}" for state, n in sorted(by_state.items()))
    lines = [
        f"version: {result.get('version', '?')}",
        f"uptime: {_duration(float(result.get('uptime_seconds', 0)))}",
        f"devices: {result.get('devices', 0)}" + (f" ({states})" if states else ""),
        f"codes outstanding: {result.get('codes_outstanding', 0)}",
        f"registrations: {result.get('registrations', 0)}" + _cluster_registrations(result),
        f"lockouts: {result.get('lockouts', 0)}",
    ]
    workers = result.get("workers")
    if workers:  # serve --workers N: one line for them all
        pids = ", ".join(str(w.get("pid", "?")) for w in workers)
        lines.append(f"workers: {result.get('workers_answering', 0)}/{len(workers)} (PIDs {pids})")
    return "\n".join(lines) + "\n"


def _workers_table(workers: list[dict[str, Any]] | None) -> str:
    """``serve --workers N``: what each worker process answered, one row each."""
    if not workers:
        return ""
    rows = [
        {
            "worker": w.get("index"),
            "pid": w.get("pid"),
            "uptime": _duration(float(w.get("uptime_seconds", 0))),
            "registrations": w.get("registrations"),
            **(w.get("served") or {}),
        }
        for w in workers
    ]
    served = sorted({key for w in workers for key in (w.get("served") or {})})
    return "\n\n" + _table(rows, ["worker", "pid", "uptime", "registrations", *served])


def _cluster_registrations(result: dict[str, Any]) -> str:
    """`` here, N in the cluster (node n, …)`` when the daemon shares bindings."""
    if result.get("cluster_registrations") is None:
        return ""
    by_node = result.get("registrations_by_node") or {}
    nodes = ", ".join(f"{node} {n}" for node, n in by_node.items())
    return f" here, {result['cluster_registrations']} in the cluster" + (
        f" ({nodes})" if nodes else ""
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the admin commands to the top-level parser's subcommands."""
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser(
        "status",
        parents=[output],
        help="what the daemon serves: devices, codes, registrations, lockouts, listeners",
    )
    p.set_defaults(func=_run_admin, admin_func=cmd_status, command="status")

    def leaf(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        func: Any,
        command: str,
        help: str,
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, parents=[output], help=help, description=help)
        parser.set_defaults(func=_run_admin, admin_func=func, command=command)
        return parser

    device = sub.add_parser("device", help="provision and inspect phones").add_subparsers(
        dest="device_command", required=True, metavar="COMMAND"
    )
    p = leaf(
        device, "add", cmd_device_add, "device add", "add a phone (BAT placeholder without --mac)"
    )
    p.add_argument("--model", required=True, help="e.g. 8841")
    p.add_argument("--mac", help="the phone's MAC; omit for a BAT placeholder")
    p.add_argument("--line", action="append", default=[], metavar="DN[:DISPLAY NAME]")
    p.add_argument("--user", default="", help="owner user id")
    p.add_argument("--description", default="")
    p.add_argument("--password", help="SIP digest password for the lines")
    p.add_argument("--auth-name", help="SIP digest user name (default: the directory number)")
    req = p.add_mutually_exclusive_group()
    req.add_argument(
        "--require-activation",
        dest="require_activation",
        action="store_const",
        const=True,
        default=None,
        help="issue an activation code",
    )
    req.add_argument(
        "--no-require-activation",
        dest="require_activation",
        action="store_const",
        const=False,
        help="no code; the phone may fetch its config at once",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="may activate over the internet through the edge (remote activation)",
    )
    p.add_argument(
        "--onboarding",
        choices=["activation-code", "autoregistration", "ivr"],
        default=None,
        help="this phone's onboarding method (default: its model's, see 'defaults')",
    )
    p = leaf(device, "set", cmd_device_set, "device set", "change a phone's permissions")
    p.add_argument("name")
    p.add_argument(
        "--allow-remote",
        dest="allow_remote",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow (or, with --no-allow-remote, forbid) activation through the edge",
    )
    leaf(
        device,
        "revoke-tokens",
        cmd_device_revoke_tokens,
        "device revoke-tokens",
        "make every OAuth token of a phone fail at once and unpin its MIC from the edge",
    ).add_argument("name")
    p = leaf(
        device,
        "edit",
        cmd_device_edit,
        "device edit",
        "change a phone's description, user or lines (what is not given stays)",
    )
    p.add_argument("name")
    p.add_argument("--description")
    p.add_argument("--user", help="owner user id ('' for none)")
    p.add_argument(
        "--line",
        action="append",
        metavar="DN[:DISPLAY NAME]",
        help="the phone's lines, all of them (repeatable); a line keeps its password",
    )
    p.add_argument("--password", help="a new SIP digest password for the --line lines")
    leaf(device, "list", cmd_device_list, "device list", "list phones")
    leaf(device, "show", cmd_device_show, "device show", "show one phone").add_argument("name")
    p = leaf(
        device,
        "set-mac",
        cmd_device_set_mac,
        "device set-mac",
        "set the real MAC (BAT→SEP) or --blank it (SEP→BAT)",
    )
    p.add_argument("name")
    p.add_argument("mac", nargs="?")
    p.add_argument("--blank", action="store_true")
    leaf(device, "delete", cmd_device_delete, "device delete", "delete a phone").add_argument(
        "name"
    )
    p = leaf(
        device,
        "require-activation",
        cmd_device_require,
        "device require-activation",
        "require an activation code (issues one), or --off",
    )
    p.add_argument("name")
    p.add_argument("--off", action="store_true")

    code = sub.add_parser("code", help="a phone's activation code").add_subparsers(
        dest="code_command", required=True, metavar="COMMAND"
    )
    leaf(code, "show", cmd_code_show, "code show", "show the code").add_argument("name")
    leaf(code, "release", cmd_code_release, "code release", "void the code").add_argument("name")
    leaf(
        code, "generate", cmd_code_generate, "code generate", "issue a new code, voiding the old"
    ).add_argument("name")
    leaf(
        code, "send", cmd_code_send, "code send", "email the code to the device's user"
    ).add_argument("name")
    register_accounts_cli(sub, output)

    codes = sub.add_parser("codes", help="all outstanding codes").add_subparsers(
        dest="codes_command", required=True, metavar="COMMAND"
    )
    leaf(
        codes, "export", cmd_codes_export, "codes export", "write outstanding codes to a CSV file"
    ).add_argument("file")

    p = sub.add_parser(
        "backup",
        parents=[output],
        help="write a consistent copy of the registry while the daemon runs",
        description="Write a consistent copy of the registry (the SQLite database) to FILE, "
        "while the daemon runs. The daemon writes the file, as its own user.",
    )
    p.set_defaults(func=_run_admin, admin_func=cmd_backup, command="backup")
    p.add_argument("file")

    p = sub.add_parser("import", parents=[output], help="bulk-add phones from a CSV file")
    p.set_defaults(func=_run_admin, admin_func=cmd_import, command="import")
    p.add_argument("file")
    p.add_argument("--dummy-mac", action="store_true", help="rows without a MAC become BAT…")

    defaults = sub.add_parser("defaults", help="per-model onboarding defaults").add_subparsers(
        dest="defaults_command", required=True, metavar="COMMAND"
    )
    leaf(defaults, "show", cmd_defaults_show, "defaults show", "show per-model defaults")
    p = leaf(defaults, "set", cmd_defaults_set, "defaults set", "set a model's onboarding method")
    p.add_argument("model")
    p.add_argument(
        "--onboarding", required=True, choices=["activation-code", "autoregistration", "ivr"]
    )


def _run_admin(args: argparse.Namespace) -> int:
    client = AdminClient(admin_socket_path(args))
    try:
        result = args.admin_func(client, args)
    except CLIError as exc:
        print(f"callboard {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(result, indent=2) if args.json else _render(args.command, result))
    return 0
