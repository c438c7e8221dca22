"""The local admin API: JSON over HTTP on an owner-only UNIX socket.

The ``callboard`` CLI is its client. Every change is logged with who made it (the peer's
uid from ``SO_PEERCRED``, and the user name the client states) and what it was, never
with a code or a password.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import socket
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from callboard.protocols.models import MODELS
from twisted.web.resource import Resource
from twisted.web.server import Request

from ..logs import get_logger
from ..registry.model import (
    ActivationCode,
    Conflict,
    Device,
    Line,
    NotFound,
    Onboarding,
    RegistryError,
    binding_of,
    group_code,
)
from ..registry.registry import BulkError, DeviceSpec, Registry
from .csvio import row_to_spec

Registrations = Callable[[str], list[dict[str, Any]]]
log = get_logger("callboard.admin")


class APIError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def code_json(code: ActivationCode | None, now: float, *, reveal: bool) -> dict[str, Any] | None:
    if code is None:
        return None
    body: dict[str, Any] = {
        "state": code.effective_state(now).value,
        "issued": iso(code.issued_at),
        "expires": iso(code.expires_at),
        "used": iso(code.used_at),
    }
    if reveal:
        body["code"] = group_code(code.code)
    return body


class AdminAPI(Resource):
    isLeaf = True

    def __init__(
        self,
        registry: Registry,
        registrations: Registrations = lambda _name: [],
        status: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry
        self._registrations = registrations
        self._status = status

    # -- HTTP plumbing -------------------------------------------------------------------

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        method = (request.method or b"GET").decode()
        parts = [p.decode() for p in (request.postpath or []) if p]
        try:
            if parts[:1] != ["v1"]:
                raise APIError(404, "unknown path")
            body = self._json_body(request) if method in ("POST", "PUT") else {}
            status, result = self._dispatch(method, parts[1:], body, request)
        except APIError as exc:
            status, result = exc.status, {"error": str(exc), **exc.extra}
        except BulkError as exc:
            problems = [{"index": i, "message": m} for i, m in exc.problems]
            status, result = 422, {"error": str(exc), "problems": problems}
        except NotFound as exc:
            status, result = 404, {"error": str(exc)}
        except Conflict as exc:
            status, result = 409, {"error": str(exc)}
        except RegistryError as exc:
            status, result = 400, {"error": str(exc)}
        request.setResponseCode(status)
        return json.dumps(result).encode() + b"\n"

    @staticmethod
    def _json_body(request: Request) -> dict[str, Any]:
        raw = request.content.read() if request.content else b""
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError(400, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    def _actor(self, request: Request) -> dict[str, Any]:
        stated = request.getHeader("x-callboard-user") or ""
        actor: dict[str, Any] = {"actor": stated[:64]}
        handle = getattr(request.channel.transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket) and handle.family == socket.AF_UNIX:
            creds = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            _pid, uid, _gid = struct.unpack("3i", creds)
            actor["actor_uid"] = uid
            with contextlib.suppress(KeyError):
                actor["actor"] = pwd.getpwuid(uid).pw_name
        return actor

    def _audit(self, request: Request, action: str, **fields: Any) -> None:
        log.info("admin change", action=action, **self._actor(request), **fields)

    # -- routes --------------------------------------------------------------------------

    def _dispatch(
        self, method: str, parts: list[str], body: dict[str, Any], request: Request
    ) -> tuple[int, Any]:
        reg = self._registry
        match method, parts:
            case "GET", ["status"]:
                return 200, {"devices": len(reg), **self._status()}
            case "GET", ["devices"]:
                return 200, [self._device_json(d) for d in reg.devices()]
            case "POST", ["devices"]:
                device = reg.add_device(self._spec(body))
                self._audit(request, "device.add", device=device.name, model=device.model)
                return 201, self._device_json(device, reveal_code=True)
            case "GET", ["devices", name]:
                return 200, self._device_json(reg.get(name), detail=True)
            case "DELETE", ["devices", name]:
                device = reg.delete(name)
                self._audit(request, "device.delete", device=device.name)
                return 200, self._device_json(device)
            case "POST", ["devices", name, "mac"]:
                mac = body.get("mac")
                if mac is not None and not isinstance(mac, str):
                    raise APIError(400, "mac must be a string or null")
                old = reg.get(name).name
                device = reg.set_mac(name, mac or None)
                self._audit(request, "device.set-mac", device=old, renamed_to=device.name)
                return 200, self._device_json(device, reveal_code=True)
            case "POST", ["devices", name, "require-activation"]:
                required = body.get("required", True)
                if not isinstance(required, bool):
                    raise APIError(400, "required must be true or false")
                device = reg.set_requires_activation(name, required)
                self._audit(
                    request, "device.require-activation", device=device.name, required=required
                )
                return 200, self._device_json(device, reveal_code=True)
            case "GET", ["devices", name, "code"]:
                device = reg.get(name)
                code = reg.current_code(device)
                if code is None:
                    raise APIError(404, f"{device.name} has no activation code")
                return 200, {
                    "device": device.name,
                    **(code_json(code, reg.now(), reveal=True) or {}),
                }
            case "POST", ["devices", name, "code", "release"]:
                code = reg.release_code(name)
                device_name = reg.get(name).name
                self._audit(request, "code.release", device=device_name)
                return 200, {
                    "device": device_name,
                    **(code_json(code, reg.now(), reveal=False) or {}),
                }
            case "POST", ["devices", name, "code", "generate"]:
                device, code = reg.generate_code(name)
                self._audit(request, "code.generate", device=device.name)
                return 200, {
                    "device": device.name,
                    **(code_json(code, reg.now(), reveal=True) or {}),
                }
            case "GET", ["codes"]:
                return 200, [self._export_row(d, c) for d, c in reg.outstanding_codes()]
            case "POST", ["import"]:
                return self._import(body, request)
            case "GET", ["defaults"]:
                return 200, [
                    {"model": m, "model_id": MODELS[m].model_id, "onboarding": o.value}
                    for m, o in reg.defaults().items()
                ]
            case "PUT", ["defaults", model]:
                try:
                    onboarding = Onboarding(str(body.get("onboarding")))
                except ValueError:
                    choices = ", ".join(o.value for o in Onboarding)
                    raise APIError(400, f"onboarding must be one of {choices}") from None
                reg.set_default(model, onboarding)
                self._audit(request, "defaults.set", model=model, onboarding=onboarding.value)
                return 200, {"model": model, "onboarding": onboarding.value}
        raise APIError(
            404 if method in ("GET", "POST", "PUT", "DELETE") else 405,
            f"no route for {method} /v1/{'/'.join(parts)}",
        )

    def _import(self, body: dict[str, Any], request: Request) -> tuple[int, Any]:
        rows = body.get("rows")
        if not isinstance(rows, list):
            raise APIError(400, "rows must be a list")
        dummy_mac = bool(body.get("dummy_mac", False))
        specs: list[DeviceSpec] = []
        lines: list[int] = []
        problems: list[dict[str, Any]] = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("cells"), dict):
                raise APIError(400, f"row {index} must be an object with cells")
            line = int(row.get("line", index + 2))
            try:
                specs.append(row_to_spec(row["cells"], dummy_mac=dummy_mac))
                lines.append(line)
            except RegistryError as exc:
                problems.append({"line": line, "message": str(exc)})
        try:
            # With bad rows already found, still check the good ones (without writing) so
            # that one run reports every bad row.
            created = self._registry.add_devices(specs, dry_run=bool(problems))
        except BulkError as exc:
            problems += [{"line": lines[i], "message": m} for i, m in exc.problems]
        if problems:
            problems.sort(key=lambda p: p["line"])
            raise APIError(
                422, f"{len(problems)} bad row(s); nothing was imported", problems=problems
            )
        self._audit(request, "import", devices=len(created))
        return 201, {"imported": len(created), "devices": [d.name for d in created]}

    # -- representations -----------------------------------------------------------------

    @staticmethod
    def _spec(body: dict[str, Any]) -> DeviceSpec:
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "model is required")
        lines = []
        for entry in body.get("lines", []) or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("directory_number"), str):
                raise APIError(400, "each line needs a directory_number")
            lines.append(
                Line(
                    directory_number=entry["directory_number"],
                    display_name=str(entry.get("display_name", "")),
                    auth_name=str(entry.get("auth_name", "")),
                    auth_password=str(entry.get("auth_password", "")),
                )
            )
        requires = body.get("requires_activation")
        if requires is not None and not isinstance(requires, bool):
            raise APIError(400, "requires_activation must be true, false or absent")
        mac = body.get("mac")
        if mac is not None and not isinstance(mac, str):
            raise APIError(400, "mac must be a string")
        return DeviceSpec(
            model=model,
            mac=mac or None,
            description=str(body.get("description", "")),
            owner_user=str(body.get("user", "")),
            lines=tuple(lines),
            requires_activation=requires,
        )

    def _device_json(
        self, device: Device, *, detail: bool = False, reveal_code: bool = False
    ) -> dict[str, Any]:
        reg = self._registry
        now = reg.now()
        body: dict[str, Any] = {
            "name": device.name,
            "model": device.model,
            "description": device.description,
            "user": device.owner_user,
            "state": device.state.value,
            "requires_activation": device.requires_activation,
            "lines": [
                {
                    "directory_number": ln.directory_number,
                    "display_name": ln.display_name,
                    "auth_name": ln.auth_name,
                    "has_password": bool(ln.auth_password),
                }
                for ln in device.lines
            ],
            "activation_code": code_json(
                reg.outstanding_code(device) if reveal_code else reg.current_code(device),
                now,
                reveal=reveal_code,
            ),
        }
        if detail:
            body.update(
                created=iso(device.created_at),
                updated=iso(device.updated_at),
                activated=iso(device.activated_at),
                mic_sha256=device.mic_sha256,
                bound_to=binding_of(device),
                registrations=self._registrations(device.name),
            )
        return body

    @staticmethod
    def _export_row(device: Device, code: ActivationCode) -> dict[str, str]:
        return {
            "device": device.name,
            "model": device.model,
            "description": device.description,
            "user": device.owner_user,
            "directory_number": " ".join(ln.directory_number for ln in device.lines),
            "activation_code": group_code(code.code),
            "expires": iso(code.expires_at) or "",
            "bound_to": binding_of(device),
        }
