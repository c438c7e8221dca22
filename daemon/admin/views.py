"""JSON shaping of the admin application's results (the socket API's wire format).

Kept apart from the routes and the rules, so that another front door (an HTTPS API, a web
console) can shape the same results its own way. Codes appear only where a view says so.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..registry.model import ActivationCode, Device, binding_of, group_code
from .app import CodeView, DefaultView, DeviceView, ImportResult, Problem, StatusView


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


def device_json(view: DeviceView) -> dict[str, Any]:
    device = view.device
    body: dict[str, Any] = {
        "name": device.name,
        "model": device.model,
        "description": device.description,
        "user": device.owner_user,
        "state": device.state.value,
        "requires_activation": device.requires_activation,
        "allow_remote": device.allow_remote,
        "lines": [
            {
                "directory_number": ln.directory_number,
                "display_name": ln.display_name,
                "auth_name": ln.auth_name,
                "has_password": bool(ln.auth_password),
            }
            for ln in device.lines
        ],
        "activation_code": code_json(view.code, view.as_of, reveal=view.reveal_code),
    }
    if view.detail:
        body.update(
            created=iso(device.created_at),
            updated=iso(device.updated_at),
            activated=iso(device.activated_at),
            mic_sha256=device.mic_sha256,
            bound_to=binding_of(device),
            token_generation=device.token_generation,
            registrations=view.registrations or [],
        )
        if view.onboarding:
            body["onboarding"] = view.onboarding
            body["onboarding_source"] = "device" if view.onboarding_own else "model default"
        if view.bootstrap is not None:
            body["bootstrap"] = view.bootstrap
    return body


def code_view_json(view: CodeView) -> dict[str, Any]:
    return {
        "device": view.device.name,
        **(code_json(view.code, view.as_of, reveal=view.reveal) or {}),
    }


def export_row(device: Device, code: ActivationCode) -> dict[str, str]:
    """One row of the codes export (the CLI writes these as guarded CSV)."""
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


def default_json(view: DefaultView) -> dict[str, Any]:
    return {"model": view.model, "model_id": view.model_id, "onboarding": view.onboarding.value}


def status_json(view: StatusView) -> dict[str, Any]:
    return {"devices": view.devices, **view.service}


def import_json(result: ImportResult) -> dict[str, Any]:
    return {"imported": len(result.devices), "devices": [d.name for d in result.devices]}


def error_json(problem: Problem) -> dict[str, Any]:
    """The socket API's error body: ``error`` (one line for the CLI) and any extra members."""
    return {"error": problem.detail, **problem.extensions}


def problem_json(problem: Problem) -> dict[str, Any]:
    """RFC 9457 problem details (``application/problem+json``), for an HTTP front door."""
    return {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        **problem.extensions,
    }
