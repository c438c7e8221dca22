"""The REST API (``/api/v1/…``) and its OpenAPI 3.1 document (``/api/openapi.json``).

Callers authenticate with a bearer token (``callboard token create``) or, from a browser,
with the session cookie plus an ``X-CSRF-Token`` header on changes. Each route declares
its access (``user``: anyone signed in, ``read``: admins and read-only tokens, ``admin``),
its request and response schemas and its refusals; the OpenAPI document is generated from
that table and the pydantic schemas. Refusals are RFC 9457 problem JSON.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..accounts import AccountsApp
from ..admin.app import Actor, AdminApp, DeviceView, Problem
from ..admin.csvio import CSVFormatError, read_import_rows
from ..registry.accounts import ApiToken, User
from ..registry.model import ActivationCode, Device, Line, Onboarding, binding_of, group_code
from ..registry.registry import DeviceSpec
from . import schemas as s
from .auth import WebAuth
from .core import Area, Ctx, Response, json_response
from .pages import export_row
from .settings import SelfCareSettings

API = "/api/v1"
ERRORS = (400, 401, 403, 404, 405, 409, 413, 415, 422, 429)
ERROR_TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Invalid rows",
    429: "Too many requests",
    502: "Mail not sent",
    503: "Mail not configured",
}


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


@dataclass(frozen=True)
class Query:
    name: str
    kind: type[Any]  # int, str or bool
    description: str
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    access: str  # user | read | admin
    response: Any
    status: int = 200
    body: type[s.Strict] | None = None
    query: tuple[Query, ...] = ()
    extra_errors: tuple[int, ...] = ()
    handler: Callable[..., Awaitable[Any]] | None = field(default=None, compare=False)


class ApiArea(Area):
    prefix = "/api/"

    def __init__(
        self,
        admin: AdminApp,
        accounts: AccountsApp,
        auth: WebAuth,
        self_care: SelfCareSettings,
        server_url: Callable[[], str] = lambda: "/",
    ) -> None:
        super().__init__()
        self.admin = admin
        self.accounts = accounts
        self.auth = auth
        self.self_care = self_care
        self.server_url = server_url
        self.operations: list[Operation] = []
        self._define()
        self._document: dict[str, Any] | None = None
        self.route("GET", "/api/openapi.json")(self.openapi)

    # -- authentication --------------------------------------------------------------------

    async def prepare(self, ctx: Ctx) -> None:
        if ctx.path == "/api/openapi.json":
            return
        header = ctx.header("authorization")
        if header:
            scheme, _, secret = header.partition(" ")
            actor = (
                self.accounts.actor_for_token(secret.strip())
                if scheme.lower() == "bearer"
                else None
            )
            if actor is None:
                raise Problem(401, "Not authenticated", "the bearer token is not valid")
            ctx.actor = actor
            ctx.read_only = self._reader(secret.strip())
            return
        session = self.auth.existing_session(ctx)
        user = self.auth.user_of(session)
        if session is None or user is None:
            raise Problem(
                401, "Not authenticated", "send Authorization: Bearer <token> (or sign in)"
            )
        if ctx.method not in ("GET", "HEAD") and not session.csrf_ok(ctx.header("x-csrf-token")):
            raise Problem.forbidden("a change with a session cookie needs its X-CSRF-Token")
        ctx.actor = self.auth.actor_of(user)
        ctx.via_cookie = True

    def _reader(self, secret: str) -> bool:
        """A read-only token sees what an admin sees, without codes or changes."""
        token = self.accounts.store.token_for(secret)
        if token is None or not token.read_only:
            return False
        if not token.user_name:
            return True
        user = self.accounts.store.user(token.user_name)
        return user is not None and user.is_admin

    def _allowed(self, ctx: Ctx, access: str) -> Actor:
        actor = ctx.actor
        if actor is None:
            raise Problem(401, "Not authenticated", "send Authorization: Bearer <token>")
        if access == "admin" and not actor.is_admin:
            raise Problem.forbidden(f"{actor.name} may not use this route (admins only)")
        if access == "read" and not (actor.is_admin or ctx.read_only):
            raise Problem.forbidden(f"{actor.name} may not use this route (admins only)")
        return actor

    # -- the route table ------------------------------------------------------------------

    def op(self, op: Operation, handler: Callable[..., Awaitable[Any]]) -> None:
        bound = Operation(**{**op.__dict__, "handler": handler})
        self.operations.append(bound)
        adapter = TypeAdapter(op.response) if op.response is not None else None
        body = TypeAdapter(op.body) if op.body is not None else None

        async def run(ctx: Ctx) -> Response:
            actor = self._allowed(ctx, op.access)
            args: list[Any] = [ctx, actor]
            if body is not None:
                raw = ctx.json_body()
                try:
                    args.append(body.validate_python(raw))
                except ValidationError as exc:
                    raise Problem.bad_request(
                        "the request body does not match the schema", errors=_errors(exc)
                    ) from None
            kwargs = {q.name: _query(ctx, q) for q in op.query}
            result = await handler(*args, **kwargs)
            payload = adapter.dump_python(result, mode="json") if adapter else None
            return json_response(payload, op.status)

        self.route(op.method, op.path)(run)

    def _define(self) -> None:
        d = API + "/devices/{name}"
        ops: list[tuple[Operation, Callable[..., Awaitable[Any]]]] = [
            (Operation("GET", API + "/status", "Listeners and counters", "status", "read",
                       s.StatusOut), self.status),
            (Operation("GET", API + "/devices", "List devices (search and paging)", "devices",
                       "read", s.DevicePage,
                       query=(Query("q", str, "search name, model, user, line, description", ""),
                              Query("offset", int, "first item", 0, 0, 10_000_000),
                              Query("limit", int, "items per page", 100, 1, 1000))),
             self.list_devices),
            (Operation("POST", API + "/devices", "Add a device (no MAC: a BAT placeholder)",
                       "devices", "admin", s.DeviceOut, 201, s.DeviceCreate), self.add_device),
            (Operation("GET", d, "Show a device", "devices", "read", s.DeviceDetail),
             self.show_device),
            (Operation("PATCH", d, "Edit a device's description, user or lines", "devices",
                       "admin", s.DeviceOut, 200, s.DeviceUpdate), self.update_device),
            (Operation("DELETE", d, "Delete a device", "devices", "admin", s.DeviceOut),
             self.delete_device),
            (Operation("PUT", d + "/mac", "Set the MAC, or null to blank it (re-onboarding)",
                       "devices", "admin", s.DeviceOut, 200, s.MacChange), self.set_mac),
            (Operation("PUT", d + "/requires-activation", "Require an activation code or not",
                       "devices", "admin", s.DeviceOut, 200, s.RequirementChange),
             self.set_required),
            (Operation("GET", d + "/registrations", "The device's SIP registrations",
                       "devices", "read", list[s.Registration]), self.registrations),
            (Operation("GET", d + "/code", "View the activation code", "codes", "admin",
                       s.DeviceCode), self.view_code),
            (Operation("POST", d + "/code/release", "Release (void) the activation code",
                       "codes", "admin", s.DeviceCode), self.release_code),
            (Operation("POST", d + "/code/generate", "Generate a new activation code",
                       "codes", "admin", s.DeviceCode), self.generate_code),
            (Operation("POST", d + "/code/send", "Email the code to the device's user",
                       "codes", "admin", s.CodeSent, extra_errors=(502,)), self.send_code),
            (Operation("GET", API + "/codes", "Export every outstanding code", "codes",
                       "admin", list[s.ExportRow]), self.export_codes),
            (Operation("POST", API + "/import", "Bulk import a CSV (all rows or none)",
                       "devices", "admin", s.ImportResult, 201, s.ImportRequest),
             self.import_csv),
            (Operation("GET", API + "/defaults", "Onboarding default per model", "defaults",
                       "read", list[s.DefaultOut]), self.list_defaults),
            (Operation("PUT", API + "/defaults/{model}", "Set a model's onboarding default",
                       "defaults", "admin", s.DefaultOut, 200, s.DefaultChange),
             self.set_default),
            (Operation("GET", API + "/users", "List users", "users", "read",
                       list[s.UserOut]), self.list_users),
            (Operation("POST", API + "/users", "Add a user", "users", "admin", s.UserOut, 201,
                       s.UserCreate), self.add_user),
            (Operation("GET", API + "/users/{name}", "Show a user (admins, or the user)",
                       "users", "user", s.UserOut), self.show_user),
            (Operation("DELETE", API + "/users/{name}", "Delete a user", "users", "admin",
                       s.UserOut, query=(Query("force", bool, "even if they own devices",
                                               False),)), self.delete_user),
            (Operation("PUT", API + "/users/{name}/password", "Set a password (admins, or "
                       "the user)", "users", "user", s.UserOut, 200, s.PasswordChange),
             self.set_password),
            (Operation("GET", API + "/tokens", "List API tokens", "tokens", "admin",
                       list[s.TokenOut]), self.list_tokens),
            (Operation("POST", API + "/tokens", "Create an API token (shown once)", "tokens",
                       "admin", s.TokenCreated, 201, s.TokenCreate), self.create_token),
            (Operation("DELETE", API + "/tokens/{name}", "Revoke an API token", "tokens",
                       "admin", s.TokenOut), self.revoke_token),
            (Operation("GET", API + "/me", "Who am I", "self-care", "user", s.UserOut),
             self.me),
            (Operation("GET", API + "/me/devices", "My phones, with codes ready to activate",
                       "self-care", "user", list[s.OwnDeviceOut]), self.my_devices),
        ]  # fmt: skip
        for operation, handler in ops:
            self.op(operation, handler)

    # -- handlers ---------------------------------------------------------------------------

    async def status(self, ctx: Ctx, actor: Actor) -> s.StatusOut:
        view = await self.admin.status(actor)
        return s.StatusOut.model_validate(
            {"devices": view.devices, "counters": {}, **dict(view.service)}
        )

    async def list_devices(
        self, ctx: Ctx, actor: Actor, q: str, offset: int, limit: int
    ) -> s.DevicePage:
        views = await self.admin.list_devices(actor)
        needle = q.strip().lower()
        if needle:
            views = [v for v in views if needle in _haystack(v.device)]
        page = views[offset : offset + limit]
        return s.DevicePage(
            total=len(views), offset=offset, limit=limit, items=[device_out(v) for v in page]
        )

    async def add_device(self, ctx: Ctx, actor: Actor, body: s.DeviceCreate) -> s.DeviceOut:
        spec = DeviceSpec(
            model=body.model,
            mac=body.mac or None,
            description=body.description,
            owner_user=body.user,
            lines=tuple(
                Line(ln.directory_number, ln.display_name, ln.auth_name, ln.auth_password)
                for ln in body.lines
            ),
            requires_activation=body.requires_activation,
        )
        return device_out(await self.admin.add_device(actor, spec))

    async def show_device(self, ctx: Ctx, actor: Actor) -> s.DeviceDetail:
        view = await self.admin.show_device(actor, ctx.params["name"])
        d = view.device
        return s.DeviceDetail(
            **device_out(view).model_dump(),
            created=iso(d.created_at),
            updated=iso(d.updated_at),
            activated=iso(d.activated_at),
            mic_sha256=d.mic_sha256,
            bound_to=binding_of(d),
            registrations=[s.Registration.model_validate(r) for r in view.registrations or []],
        )

    async def update_device(self, ctx: Ctx, actor: Actor, body: s.DeviceUpdate) -> s.DeviceOut:
        lines = (
            [Line(ln.directory_number, ln.display_name, ln.auth_name, ln.auth_password)
             for ln in body.lines]
            if body.lines is not None
            else None
        )  # fmt: skip
        view = await self.admin.update_device(
            actor, ctx.params["name"], description=body.description, owner_user=body.user,
            lines=lines,
        )  # fmt: skip
        return device_out(view)

    async def delete_device(self, ctx: Ctx, actor: Actor) -> s.DeviceOut:
        return device_out(await self.admin.delete_device(actor, ctx.params["name"]))

    async def set_mac(self, ctx: Ctx, actor: Actor, body: s.MacChange) -> s.DeviceOut:
        return device_out(await self.admin.set_mac(actor, ctx.params["name"], body.mac or None))

    async def set_required(self, ctx: Ctx, actor: Actor, body: s.RequirementChange) -> s.DeviceOut:
        view = await self.admin.set_requires_activation(actor, ctx.params["name"], body.required)
        return device_out(view)

    async def registrations(self, ctx: Ctx, actor: Actor) -> list[s.Registration]:
        view = await self.admin.show_device(actor, ctx.params["name"])
        return [s.Registration.model_validate(r) for r in view.registrations or []]

    async def view_code(self, ctx: Ctx, actor: Actor) -> s.DeviceCode:
        view = await self.admin.view_code(actor, ctx.params["name"])
        return device_code(view.device, view.code, view.as_of, view.reveal)

    async def release_code(self, ctx: Ctx, actor: Actor) -> s.DeviceCode:
        view = await self.admin.release_code(actor, ctx.params["name"])
        return device_code(view.device, view.code, view.as_of, view.reveal)

    async def generate_code(self, ctx: Ctx, actor: Actor) -> s.DeviceCode:
        view = await self.admin.generate_code(actor, ctx.params["name"])
        return device_code(view.device, view.code, view.as_of, view.reveal)

    async def send_code(self, ctx: Ctx, actor: Actor) -> s.CodeSent:
        sent = await self.accounts.send_code(actor, ctx.params["name"])
        return s.CodeSent(device=sent.device, to=sent.to, expires=iso(sent.expires_at))

    async def export_codes(self, ctx: Ctx, actor: Actor) -> list[s.ExportRow]:
        pairs = await self.admin.export_codes(actor)
        return [s.ExportRow(**export_row(dev, code)) for dev, code in pairs]

    async def import_csv(self, ctx: Ctx, actor: Actor, body: s.ImportRequest) -> s.ImportResult:
        try:
            rows = read_import_rows(body.csv.lstrip("\ufeff"))
        except CSVFormatError as exc:
            raise Problem.bad_request(f"{exc}; nothing was imported") from None
        result = await self.admin.import_devices(actor, rows, dummy_mac=body.dummy_mac)
        return s.ImportResult(
            imported=len(result.devices), devices=[d.name for d in result.devices]
        )

    async def list_defaults(self, ctx: Ctx, actor: Actor) -> list[s.DefaultOut]:
        views = await self.admin.list_defaults(actor)
        return [
            s.DefaultOut(model=v.model, model_id=v.model_id, onboarding=v.onboarding.value)
            for v in views
        ]

    async def set_default(self, ctx: Ctx, actor: Actor, body: s.DefaultChange) -> s.DefaultOut:
        view = await self.admin.set_default(actor, ctx.params["model"], Onboarding(body.onboarding))
        return s.DefaultOut(model=view.model, model_id=view.model_id, onboarding=body.onboarding)

    def _user_out(self, user: User) -> s.UserOut:
        return s.UserOut(
            name=user.name,
            display_name=user.display_name,
            email=user.email,
            admin=user.is_admin,
            has_password=user.has_password,
            devices=len(self.accounts.owned_devices(user.name)),
        )

    async def list_users(self, ctx: Ctx, actor: Actor) -> list[s.UserOut]:
        return [self._user_out(u) for u in await self.accounts.list_users(actor)]

    async def add_user(self, ctx: Ctx, actor: Actor, body: s.UserCreate) -> s.UserOut:
        user = await self.accounts.add_user(
            actor,
            body.name,
            is_admin=body.admin,
            email=body.email,
            display_name=body.display_name,
            password=body.password,
        )
        return self._user_out(user)

    async def show_user(self, ctx: Ctx, actor: Actor) -> s.UserOut:
        if not (actor.is_admin or ctx.read_only or actor.name == ctx.params["name"]):
            raise Problem.forbidden(f"{actor.name} may not see other users")
        user = await self.accounts.get_user(
            Actor(actor.name, True, actor.via) if ctx.read_only else actor, ctx.params["name"]
        )
        return self._user_out(user)

    async def delete_user(self, ctx: Ctx, actor: Actor, force: bool) -> s.UserOut:
        user = await self.accounts.delete_user(actor, ctx.params["name"], force=force)
        self.auth.sessions.end_user(user.name)
        return self._user_out(user)

    async def set_password(self, ctx: Ctx, actor: Actor, body: s.PasswordChange) -> s.UserOut:
        if ctx.read_only:
            raise Problem.forbidden("a read-only token may not change passwords")
        user = await self.accounts.set_password(actor, ctx.params["name"], body.password)
        if user.name != actor.name:
            self.auth.sessions.end_user(user.name)
        return self._user_out(user)

    async def list_tokens(self, ctx: Ctx, actor: Actor) -> list[s.TokenOut]:
        return [token_out(t) for t in await self.accounts.list_tokens(actor)]

    async def create_token(self, ctx: Ctx, actor: Actor, body: s.TokenCreate) -> s.TokenCreated:
        created = await self.accounts.create_token(
            actor, body.name, read_only=body.read_only, user=body.user
        )
        return s.TokenCreated(**token_out(created.token).model_dump(), token=created.secret)

    async def revoke_token(self, ctx: Ctx, actor: Actor) -> s.TokenOut:
        return token_out(await self.accounts.revoke_token(actor, ctx.params["name"]))

    async def me(self, ctx: Ctx, actor: Actor) -> s.UserOut:
        user = self.accounts.store.user(actor.name)
        if user is None:
            return s.UserOut(
                name=actor.name,
                display_name="",
                email="",
                admin=actor.is_admin,
                has_password=False,
                devices=0,
            )
        return self._user_out(user)

    async def my_devices(self, ctx: Ctx, actor: Actor) -> list[s.OwnDeviceOut]:
        show = self.self_care.show_phones_ready_to_activate
        out = []
        for own in await self.accounts.own_devices(actor):
            dev = own.device
            code = own.code if show and dev.state.value == "awaiting-activation" else None
            out.append(
                s.OwnDeviceOut(
                    name=dev.name,
                    model=dev.model,
                    description=dev.description,
                    lines=[ln.directory_number for ln in dev.lines],
                    state=dev.state.value,
                    activation_code=group_code(code.code) if code else None,
                    expires=iso(code.expires_at) if code else None,
                )
            )
        return out

    # -- the OpenAPI document ---------------------------------------------------------------

    async def openapi(self, ctx: Ctx) -> Response:
        if self._document is None:
            self._document = openapi_document(self.operations)
        response = json_response(self._document)
        response.headers["Cache-Control"] = "no-cache"
        return response


def device_out(view: DeviceView) -> s.DeviceOut:
    d = view.device
    return s.DeviceOut(
        name=d.name,
        model=d.model,
        description=d.description,
        user=d.owner_user,
        state=d.state.value,
        requires_activation=d.requires_activation,
        lines=[
            s.LineOut(
                directory_number=ln.directory_number,
                display_name=ln.display_name,
                auth_name=ln.auth_name,
                has_password=bool(ln.auth_password),
            )
            for ln in d.lines
        ],
        activation_code=code_out(view.code, view.as_of, view.reveal_code) if view.code else None,
    )


def code_out(code: ActivationCode, as_of: float, reveal: bool) -> s.CodeOut:
    return s.CodeOut(
        state=code.effective_state(as_of).value,
        issued=iso(code.issued_at),
        expires=iso(code.expires_at),
        used=iso(code.used_at),
        code=group_code(code.code) if reveal else None,
    )


def device_code(device: Device, code: ActivationCode, as_of: float, reveal: bool) -> s.DeviceCode:
    return s.DeviceCode(device=device.name, **code_out(code, as_of, reveal).model_dump())


def token_out(token: ApiToken) -> s.TokenOut:
    return s.TokenOut(
        name=token.name,
        read_only=token.read_only,
        user=token.user_name,
        created_by=token.created_by,
        created=iso(token.created_at),
    )


def _haystack(device: Device) -> str:
    return " ".join(
        [device.name, device.model, device.description, device.owner_user]
        + [ln.directory_number for ln in device.lines]
    ).lower()


def _query(ctx: Ctx, q: Query) -> Any:
    raw = ctx.query(q.name, "")
    if raw == "":
        return q.default
    if q.kind is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise Problem.bad_request(f"query parameter {q.name} must be true or false")
    if q.kind is int:
        try:
            value = int(raw)
        except ValueError:
            raise Problem.bad_request(f"query parameter {q.name} must be an integer") from None
        low = q.minimum if q.minimum is not None else value
        high = q.maximum if q.maximum is not None else value
        if not low <= value <= high:
            raise Problem.bad_request(f"query parameter {q.name} must be in {low}..{high}")
        return value
    return raw[:200]


def _errors(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {"at": "/".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


# -- OpenAPI generation --------------------------------------------------------------------------

REF = "#/components/schemas/{model}"


def _schema(tp: Any, mode: str, components: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = TypeAdapter(tp).json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
    components.update(schema.pop("$defs", {}))
    name = getattr(tp, "__name__", None)
    if isinstance(tp, type) and name and schema.get("type") == "object":
        components[name] = schema
        return {"$ref": REF.format(model=name)}
    return schema


def _query_schema(q: Query) -> dict[str, Any]:
    kind = {int: "integer", bool: "boolean", str: "string"}[q.kind]
    schema: dict[str, Any] = {"type": kind}
    if q.minimum is not None:
        schema["minimum"] = q.minimum
    if q.maximum is not None:
        schema["maximum"] = q.maximum
    if q.kind is str:
        schema["maxLength"] = 200
    return schema


def openapi_document(operations: list[Operation]) -> dict[str, Any]:
    """OpenAPI 3.1 for every operation, schemas from pydantic (JSON Schema 2020-12)."""
    components: dict[str, Any] = {}
    problem_ref = _schema(s.Problem, "serialization", components)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses: dict[str, Any] = {
            str(op.status): {
                "description": "OK" if op.status == 200 else "Created",
                "content": {
                    "application/json": {
                        "schema": _schema(op.response, "serialization", components)
                    }
                },
            }
        }
        for status in (*ERRORS, *op.extra_errors):
            responses[str(status)] = {
                "description": ERROR_TITLES[status],
                "content": {"application/problem+json": {"schema": problem_ref}},
            }
        if op.body is None:
            responses.pop("415")
        parameters: list[dict[str, Any]] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "maxLength": 64},
            }
            for name in _path_names(op.path)
        ]
        parameters += [
            {
                "name": q.name,
                "in": "query",
                "required": False,
                "description": q.description,
                "schema": _query_schema(q),
            }
            for q in op.query
        ]
        operation: dict[str, Any] = {
            "operationId": _operation_id(op),
            "summary": op.summary,
            "tags": [op.tag],
            "description": f"Access: {op.access}.",
            "responses": responses,
        }
        if parameters:
            operation["parameters"] = parameters
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": _schema(op.body, "validation", components)}
                },
            }
        paths.setdefault(op.path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Callboard REST API",
            "version": "1",
            "description": "Devices, activation codes, defaults, users and tokens. Errors are "
            "RFC 9457 problem JSON.",
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token from `callboard token create`",
                }
            },
        },
    }


def _path_names(path: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", path)


def _operation_id(op: Operation) -> str:
    words = [
        "by_" + p[1:-1] if p.startswith("{") else p.replace("-", "_")
        for p in op.path.removeprefix(API).split("/")
        if p
    ]
    return op.method.lower() + "_" + "_".join(words)
