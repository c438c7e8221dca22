"""The local admin API: JSON over HTTP on an owner-only UNIX socket.

The ``callboard`` CLI is its client. This module is only the front door: it routes a request
to :class:`~callboard.daemon.admin.app.AdminApp`, with an :class:`Actor` built from the peer's
credentials (``SO_PEERCRED``: reaching the owner-only socket is what makes an admin), and
shapes the answer as JSON. Validation lives in :mod:`.validation`, the JSON shapes in
:mod:`.views`, permissions and the audit log in the app.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..logs import get_logger
from . import validation, views
from .app import Actor, AdminApp, Problem
from .views import iso

__all__ = ["AdminAPI", "iso", "socket_actor"]

log = get_logger("callboard.admin")

Reply = tuple[int, Any]


def socket_actor(request: Request) -> Actor:
    """Who is asking over the admin socket: the peer's user (its uid, from the kernel) or,
    where the transport cannot tell, the user name the client states."""
    stated = (request.getHeader("x-callboard-user") or "")[:64]
    actor = Actor(name=stated, is_admin=True, via="admin-socket")
    handle = getattr(request.channel.transport, "getHandle", lambda: None)()
    if isinstance(handle, socket.socket) and handle.family == socket.AF_UNIX:
        creds = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        _pid, uid, _gid = struct.unpack("3i", creds)
        name = stated
        with contextlib.suppress(KeyError):
            name = pwd.getpwuid(uid).pw_name
        actor = Actor(name=name, is_admin=True, via="admin-socket", uid=uid)
    return actor


class AdminAPI(Resource):
    isLeaf = True

    def __init__(self, app: AdminApp) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.app = app

    # -- HTTP plumbing -------------------------------------------------------------------

    def render(self, request: Request) -> int:
        request.setHeader(b"content-type", b"application/json")
        method = (request.method or b"GET").decode()
        parts = [p.decode() for p in (request.postpath or []) if p]
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(reply: Reply) -> None:
            status, body = reply
            if gone:
                return  # the client left; the change (if any) stands and is audited
            request.setResponseCode(status)
            request.write(json.dumps(body).encode() + b"\n")
            request.finish()

        def refused(failure: Failure) -> Reply:
            if isinstance(failure.value, Problem):
                return failure.value.status, views.error_json(failure.value)
            log.error(
                "admin request failed",
                method=method,
                path="/".join(parts),
                error=repr(failure.value),
                traceback=failure.getTraceback(),
            )
            return 500, {"error": "internal error; see the daemon's log"}

        d: Deferred[Reply] = maybeDeferred(self._route, method, parts, request)
        d.addErrback(refused).addCallback(answer)
        return NOT_DONE_YET

    # -- routes --------------------------------------------------------------------------

    def _route(self, method: str, parts: list[str], request: Request) -> Deferred[Reply]:
        if parts[:1] != ["v1"]:
            raise Problem.not_found("unknown path")
        raw = request.content.read() if request.content else b""
        body = validation.json_object(raw) if method in ("POST", "PUT") else {}
        actor = socket_actor(request)
        app = self.app
        match method, parts[1:]:
            case "GET", ["status"]:
                return _reply(200, app.status(actor), views.status_json)
            case "POST", ["backup"]:
                path = body.get("file")
                if not isinstance(path, str) or not path.startswith("/"):
                    raise Problem.bad_request("file: an absolute path is needed")
                return _reply(200, app.backup(actor, path), lambda result: result)
            case "GET", ["devices"]:
                return _reply(
                    200, app.list_devices(actor), lambda ds: [views.device_json(d) for d in ds]
                )
            case "POST", ["devices"]:
                spec = validation.device_spec(body)
                return _reply(201, app.add_device(actor, spec), views.device_json)
            case "GET", ["devices", name]:
                return _reply(200, app.show_device(actor, name), views.device_json)
            case "DELETE", ["devices", name]:
                return _reply(200, app.delete_device(actor, name), views.device_json)
            case "POST", ["devices", name, "mac"]:
                mac = validation.new_mac(body)
                return _reply(200, app.set_mac(actor, name, mac), views.device_json)
            case "POST", ["devices", name, "require-activation"]:
                required = validation.required_flag(body)
                return _reply(
                    200, app.set_requires_activation(actor, name, required), views.device_json
                )
            case "POST", ["devices", name, "allow-remote"]:
                allowed = validation.allowed_flag(body)
                return _reply(200, app.set_allow_remote(actor, name, allowed), views.device_json)
            case "POST", ["devices", name, "revoke-tokens"]:
                return _reply(200, app.revoke_tokens(actor, name), views.device_json)
            case "GET", ["devices", name, "code"]:
                return _reply(200, app.view_code(actor, name), views.code_view_json)
            case "POST", ["devices", name, "code", "release"]:
                return _reply(200, app.release_code(actor, name), views.code_view_json)
            case "POST", ["devices", name, "code", "generate"]:
                return _reply(200, app.generate_code(actor, name), views.code_view_json)
            case "GET", ["codes"]:
                return _reply(
                    200, app.export_codes(actor), lambda rows: [views.export_row(*r) for r in rows]
                )
            case "POST", ["import"]:
                rows, dummy_mac = validation.import_rows(body)
                imported = app.import_devices(actor, rows, dummy_mac=dummy_mac)
                return _reply(201, imported, views.import_json)
            case "GET", ["defaults"]:
                return _reply(
                    200, app.list_defaults(actor), lambda ds: [views.default_json(d) for d in ds]
                )
            case "PUT", ["defaults", model]:
                onboarding = validation.onboarding(body)
                changed = app.set_default(actor, model, onboarding)
                return _reply(
                    200, changed, lambda v: {"model": v.model, "onboarding": v.onboarding.value}
                )
        raise Problem(
            404 if method in ("GET", "POST", "PUT", "DELETE") else 405,
            "Not found" if method in ("GET", "POST", "PUT", "DELETE") else "Method not allowed",
            f"no route for {method} /{'/'.join(parts)}",
        )


def _reply(status: int, result: Deferred[Any], shape: Callable[[Any], Any]) -> Deferred[Reply]:
    return result.addCallback(lambda value: (status, shape(value)))
