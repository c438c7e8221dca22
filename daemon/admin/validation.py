"""Validation of admin API request bodies: JSON in, typed arguments out, or a 400 problem.

Only the shape of a request is checked here; the registry's rules (a supported model, a
well-formed MAC, unique names) are checked by the registry itself.
"""

from __future__ import annotations

import json
from typing import Any

from ..registry.model import Line, Onboarding
from ..registry.registry import DeviceSpec
from .app import Problem
from .csvio import ImportRow


def json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (an empty body is an empty object)."""
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise Problem.bad_request("request body is not JSON") from None
    if not isinstance(body, dict):
        raise Problem.bad_request("request body must be a JSON object")
    return body


def device_spec(body: dict[str, Any]) -> DeviceSpec:
    model = body.get("model")
    if not isinstance(model, str):
        raise Problem.bad_request("model is required")
    lines = []
    for entry in body.get("lines", []) or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("directory_number"), str):
            raise Problem.bad_request("each line needs a directory_number")
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
        raise Problem.bad_request("requires_activation must be true, false or absent")
    mac = body.get("mac")
    if mac is not None and not isinstance(mac, str):
        raise Problem.bad_request("mac must be a string")
    allow_remote = body.get("allow_remote", False)
    if not isinstance(allow_remote, bool):
        raise Problem.bad_request("allow_remote must be true or false")
    own = body.get("onboarding")
    return DeviceSpec(
        onboarding=None if own is None else onboarding(body),
        allow_remote=allow_remote,
        model=model,
        mac=mac or None,
        description=str(body.get("description", "")),
        owner_user=str(body.get("user", "")),
        lines=tuple(lines),
        requires_activation=requires,
    )


def new_mac(body: dict[str, Any]) -> str | None:
    """The MAC to set; None (or empty) blanks it."""
    mac = body.get("mac")
    if mac is not None and not isinstance(mac, str):
        raise Problem.bad_request("mac must be a string or null")
    return mac or None


def required_flag(body: dict[str, Any]) -> bool:
    required = body.get("required", True)
    if not isinstance(required, bool):
        raise Problem.bad_request("required must be true or false")
    return required


def allowed_flag(body: dict[str, Any]) -> bool:
    allowed = body.get("allowed", True)
    if not isinstance(allowed, bool):
        raise Problem.bad_request("allowed must be true or false")
    return allowed


def onboarding(body: dict[str, Any]) -> Onboarding:
    try:
        return Onboarding(str(body.get("onboarding")))
    except ValueError:
        choices = ", ".join(o.value for o in Onboarding)
        raise Problem.bad_request(f"onboarding must be one of {choices}") from None


def import_rows(body: dict[str, Any]) -> tuple[list[ImportRow], bool]:
    """The rows to import (with their CSV line numbers) and the ``dummy_mac`` flag."""
    rows = body.get("rows")
    if not isinstance(rows, list):
        raise Problem.bad_request("rows must be a list")
    parsed = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("cells"), dict):
            raise Problem.bad_request(f"row {index} must be an object with cells")
        try:
            line = int(row.get("line", index + 2))
        except (TypeError, ValueError):
            raise Problem.bad_request(f"row {index}: line must be a number") from None
        parsed.append(ImportRow(line, row["cells"]))
    return parsed, bool(body.get("dummy_mac", False))
