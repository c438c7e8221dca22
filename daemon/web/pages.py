"""The HTML pages: sign-in, Self-Care (``/self-care/``) and the admin console (``/admin/``).

Jinja2 templates with auto-escaping; plain forms (no JavaScript anywhere); a CSRF token in
every form, checked on every POST; the QR code is inline SVG made by ``segno``. Admin pages
call the same :class:`AdminApp` / :class:`AccountsApp` methods as the socket and the REST
API, with the signed-in user as the actor, so they refuse and audit the same way.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import segno
from callboard.protocols.models import MODELS
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from ..accounts import AccountsApp
from ..admin.app import AdminApp, Problem
from ..admin.csvio import IMPORT_COLUMNS, CSVFormatError, read_import_rows, write_codes_csv
from ..registry.accounts import User
from ..registry.model import ActivationCode, Device, DeviceState, Line, Onboarding, group_code
from ..registry.registry import DeviceSpec
from .auth import WebAuth
from .core import Area, Ctx, Response, redirect, sign_in_location
from .settings import SelfCareSettings

HERE = Path(__file__).parent
PAGE_SIZE = 50

STATE_TEXT = {
    DeviceState.ACTIVE: "Active",
    DeviceState.AWAITING_ACTIVATION: "Ready to activate",
    DeviceState.PROVISIONED: "Provisioned (no activation needed)",
}


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def qr_svg(digits: str) -> Markup:
    """A full QR symbol (version 1, never Micro QR) for the 16 digits, 290 px, inline SVG."""
    qr = segno.make_qr(digits, error="m")
    svg = qr.svg_inline(scale=10, dark="#000", light="#fff", title="QR code of the activation code")
    return Markup(svg)  # segno's own markup; the digits are the only data in it


def lines_text(device: Device) -> str:
    return ", ".join(
        f"{ln.directory_number} ({ln.display_name})" if ln.display_name else ln.directory_number
        for ln in device.lines
    )


class PagesArea(Area):
    prefix = "/"

    def __init__(
        self,
        admin: AdminApp,
        accounts: AccountsApp,
        auth: WebAuth,
        self_care: SelfCareSettings,
    ) -> None:
        super().__init__()
        self.admin = admin
        self.accounts = accounts
        self.auth = auth
        self.self_care = self_care
        self.env = Environment(
            loader=FileSystemLoader(str(HERE / "templates")),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.css = (HERE / "static" / "style.css").read_bytes()
        self._add_routes()

    # -- plumbing ---------------------------------------------------------------------------

    async def prepare(self, ctx: Ctx) -> None:
        if ctx.path.startswith("/static/"):
            return
        session = self.auth.session(ctx)
        if ctx.method == "POST" and not session.csrf_ok(ctx.form("csrf")):
            raise Problem.forbidden("The form's security token is missing or out of date.")
        user = self.auth.user_of(session)
        if user is not None:
            ctx.actor = self.auth.actor_of(user)

    def refusal(self, ctx: Ctx, problem: Problem) -> Response:
        if problem.status == 401 and ctx.method in ("GET", "HEAD"):
            return redirect(sign_in_location(ctx.path))
        return self.page(
            ctx, "error.html", problem.status, title=problem.title, detail=problem.detail
        )

    def page(self, ctx: Ctx, template: str, status: int = 200, **values: Any) -> Response:
        user = self.auth.user_of(ctx.session)
        html = self.env.get_template(template).render(
            user=user, csrf=ctx.session.csrf if ctx.session else "", **values
        )
        return Response(status, html.encode(), headers={"Cache-Control": "no-store"})

    def need_user(self, ctx: Ctx) -> User:
        user = self.auth.user_of(ctx.session)
        if user is None:
            raise Problem(401, "Sign-in required", "Sign in first.")
        return user

    def need_admin(self, ctx: Ctx) -> User:
        user = self.need_user(ctx)
        if not user.is_admin:
            raise Problem.forbidden("This page is for administrators.")
        return user

    # -- routes -----------------------------------------------------------------------------

    def _add_routes(self) -> None:
        r = self.route
        r("GET", "/")(self.home)
        r("GET", "/static/style.css")(self.style)
        r("GET", "/sign-in")(self.sign_in_form)
        r("POST", "/sign-in")(self.sign_in)
        r("POST", "/sign-out")(self.sign_out)
        r("GET", "/self-care/")(self.my_phones)
        r("GET", "/self-care")(self.to_self_care)
        r("GET", "/admin/")(self.admin_home)
        r("GET", "/admin")(self.admin_home)
        r("GET", "/admin/devices")(self.devices)
        r("GET", "/admin/devices/new")(self.device_new_form)
        r("POST", "/admin/devices/new")(self.device_new)
        r("GET", "/admin/devices/{name}")(self.device)
        r("POST", "/admin/devices/{name}/code")(self.device_code)
        r("POST", "/admin/devices/{name}/code/release")(self.device_release)
        r("POST", "/admin/devices/{name}/code/generate")(self.device_generate)
        r("POST", "/admin/devices/{name}/code/send")(self.device_send)
        r("POST", "/admin/devices/{name}/edit")(self.device_edit)
        r("POST", "/admin/devices/{name}/mac")(self.device_mac)
        r("POST", "/admin/devices/{name}/requires-activation")(self.device_require)
        r("POST", "/admin/devices/{name}/delete")(self.device_delete)
        r("GET", "/admin/codes.csv")(self.codes_csv)
        r("GET", "/admin/import")(self.import_form)
        r("POST", "/admin/import")(self.import_csv)
        r("GET", "/admin/defaults")(self.defaults)
        r("POST", "/admin/defaults/{model}")(self.set_default)
        r("GET", "/admin/users")(self.users)
        r("POST", "/admin/users")(self.user_add)
        r("POST", "/admin/users/{name}/delete")(self.user_delete)
        r("POST", "/admin/users/{name}/password")(self.user_password)
        r("GET", "/admin/tokens")(self.tokens)
        r("POST", "/admin/tokens")(self.token_create)
        r("POST", "/admin/tokens/{name}/revoke")(self.token_revoke)
        r("GET", "/admin/status")(self.status)

    async def home(self, ctx: Ctx) -> Response:
        user = self.auth.user_of(ctx.session)
        if user is None:
            return redirect("/sign-in")
        return redirect("/admin/devices" if user.is_admin else "/self-care/")

    async def style(self, ctx: Ctx) -> Response:
        return Response(
            200, self.css, "text/css; charset=utf-8", {"Cache-Control": "public, max-age=3600"}
        )

    async def to_self_care(self, ctx: Ctx) -> Response:
        return redirect("/self-care/", 301)

    # -- sign-in ------------------------------------------------------------------------------

    async def sign_in_form(self, ctx: Ctx) -> Response:
        return self.page(ctx, "sign_in.html", next=_safe_next(ctx.query("next")), username="")

    async def sign_in(self, ctx: Ctx) -> Response:
        name = ctx.form("username")
        target = _safe_next(ctx.form("next"))
        try:
            user = await self.auth.sign_in(ctx, name, ctx.form("password"))
        except Problem as problem:
            return self.page(
                ctx,
                "sign_in.html",
                problem.status,
                error=problem.detail,
                next=target,
                username=name[:64],
            )
        if target == "/":
            target = "/admin/devices" if user.is_admin else "/self-care/"
        return redirect(target)

    async def sign_out(self, ctx: Ctx) -> Response:
        self.auth.sign_out(ctx)
        return redirect("/sign-in")

    # -- Self-Care -----------------------------------------------------------------------------

    async def my_phones(self, ctx: Ctx) -> Response:
        user = self.need_user(ctx)
        assert ctx.actor is not None
        show = self.self_care.show_phones_ready_to_activate
        phones = []
        for own in await self.accounts.own_devices(ctx.actor):
            d = own.device
            ready = d.state is DeviceState.AWAITING_ACTIVATION
            entry: dict[str, Any] = {
                "name": d.name,
                "model": d.model,
                "description": d.description,
                "lines": lines_text(d),
                "state": d.state.value,
                "state_text": STATE_TEXT.get(d.state, d.state.value),
                "ready": ready,
            }
            if ready and show and own.code is not None:
                entry.update(
                    code=group_code(own.code.code),
                    expires=when(own.code.expires_at),
                    qr=qr_svg(own.code.code),
                )
            phones.append(entry)
        return self.page(ctx, "self_care.html", phones=phones, show_codes=show, me=user)

    # -- admin: devices ----------------------------------------------------------------------

    async def admin_home(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        return redirect("/admin/devices")

    async def devices(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        q = ctx.query("q").strip()[:200]
        views = await self.admin.list_devices(ctx.actor)
        rows = [v for v in views if _matches(v.device, q)] if q else views
        offset = _int(ctx.query("offset"), 0, 0, max(len(rows) - 1, 0))
        page = rows[offset : offset + PAGE_SIZE]
        return self.page(
            ctx,
            "admin_devices.html",
            q=q,
            total=len(rows),
            first=offset + 1 if rows else 0,
            last=offset + len(page),
            prev=max(offset - PAGE_SIZE, 0) if offset > 0 else None,
            next=offset + PAGE_SIZE if offset + PAGE_SIZE < len(rows) else None,
            devices=[
                {
                    "name": v.device.name,
                    "model": v.device.model,
                    "state": v.device.state.value,
                    "lines": lines_text(v.device),
                    "user": v.device.owner_user,
                    "code_state": v.code.effective_state(v.as_of).value if v.code else "-",
                    "description": v.device.description,
                }
                for v in page
            ],
        )

    def _device_form(self, ctx: Ctx) -> dict[str, str]:
        return {
            k: ctx.form(k)
            for k in ("model", "mac", "description", "user", "lines", "requires_activation")
        }

    async def device_new_form(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        form = dict.fromkeys(("model", "mac", "description", "user", "lines"), "")
        form["model"] = "8841"
        form["requires_activation"] = "yes"
        return self.page(ctx, "admin_device_new.html", models=list(MODELS), form=form)

    async def device_new(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        form = self._device_form(ctx)
        lines = form_lines(form["lines"], ctx.form("password"))
        flag = form["requires_activation"]
        spec = DeviceSpec(
            model=form["model"],
            mac=form["mac"].strip() or None,
            description=form["description"].strip(),
            owner_user=form["user"].strip(),
            lines=lines,
            requires_activation=True if flag == "yes" else False if flag == "no" else None,
        )
        try:
            view = await self.admin.add_device(ctx.actor, spec)
        except Problem as problem:
            return self.page(
                ctx,
                "admin_device_new.html",
                problem.status,
                error=problem.detail,
                models=list(MODELS),
                form=form,
            )
        return redirect(f"/admin/devices/{view.device.name}?added=1")

    async def device(self, ctx: Ctx, code: dict[str, Any] | None = None, **extra: Any) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        view = await self.admin.show_device(ctx.actor, ctx.params["name"])
        d = view.device
        current = view.code
        notice = extra.pop("notice", _device_notice(ctx))
        return self.page(
            ctx,
            "admin_device.html",
            extra.pop("status", 200),
            d={
                "name": d.name,
                "model": d.model,
                "state": d.state.value,
                "requires_activation": d.requires_activation,
                "description": d.description,
                "user": d.owner_user,
                "lines": lines_text(d),
                "lines_form": "\n".join(
                    f"{ln.directory_number}:{ln.display_name}"
                    if ln.display_name
                    else ln.directory_number
                    for ln in d.lines
                ),
                "mac": d.mac,
                "bound_to": ("mac:" + d.mac) if d.mac else f"model:{d.model}",
                "code_state": current.effective_state(view.as_of).value if current else "none",
                "code_expires": when(current.expires_at) if current else "",
                "registrations": view.registrations or [],
            },
            code=code,
            notice=notice,
            **extra,
        )

    def _code(self, code: ActivationCode, as_of: float, reveal: bool) -> dict[str, Any]:
        state = code.effective_state(as_of)
        return {
            "code": group_code(code.code) if reveal else "(hidden)",
            "state": state.value,
            "expires": when(code.expires_at),
            "qr": qr_svg(code.code) if reveal and code.is_outstanding(as_of) else None,
        }

    async def device_code(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        view = await self.admin.view_code(ctx.actor, ctx.params["name"])
        return await self.device(ctx, code=self._code(view.code, view.as_of, view.reveal))

    async def device_release(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        view = await self.admin.release_code(ctx.actor, ctx.params["name"])
        return redirect(f"/admin/devices/{view.device.name}")

    async def device_generate(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        view = await self.admin.generate_code(ctx.actor, ctx.params["name"])
        ctx.params["name"] = view.device.name
        return await self.device(
            ctx, code=self._code(view.code, view.as_of, True), notice="New code issued."
        )

    async def device_send(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        try:
            sent = await self.accounts.send_code(ctx.actor, ctx.params["name"])
        except Problem as problem:
            return await self.device(ctx, error=problem.detail)
        return await self.device(ctx, notice=f"Code sent to {sent.to}.")

    async def device_edit(self, ctx: Ctx) -> Response:
        """Description, user and lines; a line keeps its SIP password unless a new one is
        given."""
        self.need_admin(ctx)
        assert ctx.actor is not None
        try:
            view = await self.admin.update_device(
                ctx.actor,
                ctx.params["name"],
                description=ctx.form("description"),
                owner_user=ctx.form("user"),
                lines=form_lines(ctx.form("lines"), ctx.form("password")),
            )
        except Problem as problem:
            if problem.status == 404:
                raise
            return await self.device(ctx, status=problem.status, error=problem.detail)
        return redirect(f"/admin/devices/{view.device.name}?updated=1")

    async def device_mac(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        mac = None if ctx.form("blank") else ctx.form("mac").strip() or None
        view = await self.admin.set_mac(ctx.actor, ctx.params["name"], mac)
        return redirect(f"/admin/devices/{view.device.name}")

    async def device_require(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        required = ctx.form("required") == "yes"
        view = await self.admin.set_requires_activation(ctx.actor, ctx.params["name"], required)
        return redirect(f"/admin/devices/{view.device.name}")

    async def device_delete(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        if ctx.form("confirm") != "yes":
            raise Problem.bad_request("Tick the confirmation box to delete a device.")
        await self.admin.delete_device(ctx.actor, ctx.params["name"])
        return redirect("/admin/devices")

    async def codes_csv(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        pairs = await self.admin.export_codes(ctx.actor)
        text = write_codes_csv(export_row(d, c) for d, c in pairs)
        return Response(
            200,
            text.encode(),
            "text/csv; charset=utf-8",
            {
                "Content-Disposition": 'attachment; filename="activation-codes.csv"',
                "Cache-Control": "no-store",
            },
        )

    async def import_form(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        return self.page(ctx, "admin_import.html", columns=", ".join(IMPORT_COLUMNS))

    async def import_csv(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        raw = ctx.form_bytes("file") or b""
        columns = ", ".join(IMPORT_COLUMNS)

        def refused(status: int, message: str, problems: Any = None) -> Response:
            return self.page(
                ctx,
                "admin_import.html",
                status,
                error=message,
                problems=problems,
                columns=columns,
            )

        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            return refused(400, "The file is not UTF-8 text; nothing was imported.")
        try:
            rows = read_import_rows(text)
        except CSVFormatError as exc:
            return refused(400, f"{exc}; nothing was imported.")
        try:
            result = await self.admin.import_devices(
                ctx.actor, rows, dummy_mac=ctx.form("dummy_mac") == "yes"
            )
        except Problem as problem:
            return refused(problem.status, problem.detail, problem.extensions.get("problems"))
        return self.page(
            ctx,
            "admin_import.html",
            notice=f"Imported {len(result.devices)} device(s).",
            imported=[d.name for d in result.devices],
            columns=columns,
        )

    # -- admin: defaults, users, tokens, status ------------------------------------------------

    async def defaults(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        views = await self.admin.list_defaults(ctx.actor)
        return self.page(ctx, "admin_defaults.html", defaults=views)

    async def set_default(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        try:
            onboarding = Onboarding(ctx.form("onboarding"))
        except ValueError:
            raise Problem.bad_request(
                "onboarding must be activation-code, autoregistration or ivr"
            ) from None
        await self.admin.set_default(ctx.actor, ctx.params["model"], onboarding)
        return redirect("/admin/defaults")

    async def users(self, ctx: Ctx, status: int = 200, **extra: Any) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        users = await self.accounts.list_users(ctx.actor)
        rows = [{**u.__dict__, "phones": len(self.accounts.owned_devices(u.name))} for u in users]
        return self.page(ctx, "admin_users.html", status, users=rows, **extra)

    async def user_add(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        try:
            user = await self.accounts.add_user(
                ctx.actor,
                ctx.form("name"),
                is_admin=ctx.form("admin") == "yes",
                email=ctx.form("email"),
                display_name=ctx.form("display_name"),
                password=ctx.form("password") or None,
            )
        except Problem as problem:
            return await self.users(ctx, problem.status, error=problem.detail)
        return await self.users(ctx, notice=f"User {user.name} added.")

    async def user_delete(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        name = ctx.params["name"]
        try:
            await self.accounts.delete_user(ctx.actor, name, force=ctx.form("force") == "yes")
        except Problem as problem:
            return await self.users(ctx, problem.status, error=problem.detail)
        self.auth.sessions.end_user(name)
        return await self.users(ctx, notice=f"User {name} deleted.")

    async def user_password(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        name = ctx.params["name"]
        try:
            await self.accounts.set_password(ctx.actor, name, ctx.form("password"))
        except Problem as problem:
            return await self.users(ctx, problem.status, error=problem.detail)
        if name != ctx.actor.name:
            self.auth.sessions.end_user(name)
        return await self.users(ctx, notice=f"Password of {name} set.")

    async def tokens(self, ctx: Ctx, status: int = 200, **extra: Any) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        tokens = await self.accounts.list_tokens(ctx.actor)
        return self.page(ctx, "admin_tokens.html", status, tokens=tokens, **extra)

    async def token_create(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        try:
            created = await self.accounts.create_token(
                ctx.actor, ctx.form("name"), read_only=ctx.form("read_only") == "yes"
            )
        except Problem as problem:
            return await self.tokens(ctx, problem.status, error=problem.detail)
        return await self.tokens(ctx, secret=created.secret, secret_name=created.token.name)

    async def token_revoke(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        await self.accounts.revoke_token(ctx.actor, ctx.params["name"])
        return redirect("/admin/tokens")

    async def status(self, ctx: Ctx) -> Response:
        self.need_admin(ctx)
        assert ctx.actor is not None
        view = await self.admin.status(ctx.actor)
        service = dict(view.service)
        counters = service.pop("counters", {}) or {}
        listeners = [(k, v) for k, v in service.items() if isinstance(v, list)]
        return self.page(
            ctx,
            "admin_status.html",
            devices=view.devices,
            users=len(self.accounts.store.users),
            sessions=len(self.auth.sessions),
            listeners=listeners,
            counters=sorted(counters.items()),
        )


def export_row(device: Device, code: ActivationCode) -> dict[str, str]:
    return {
        "device": device.name,
        "model": device.model,
        "description": device.description,
        "user": device.owner_user,
        "directory_number": " ".join(ln.directory_number for ln in device.lines),
        "activation_code": group_code(code.code),
        "expires": dt.datetime.fromtimestamp(code.expires_at, dt.UTC).isoformat(timespec="seconds"),
        "bound_to": f"mac:{device.mac}" if device.mac else f"model:{device.model}",
    }


def form_lines(text: str, password: str) -> tuple[Line, ...]:
    """The lines textarea: one per line, ``DN`` or ``DN:Display name``."""
    lines = []
    for raw in text.splitlines():
        if raw.strip():
            dn, _, display = raw.strip().partition(":")
            lines.append(Line(dn.strip(), display.strip(), "", password))
    return tuple(lines)


def _device_notice(ctx: Ctx) -> str | None:
    if ctx.query("added"):
        return "Device added."
    if ctx.query("updated"):
        return "Device updated."
    return None


def _matches(device: Device, q: str) -> bool:
    needle = q.lower()
    hay = " ".join(
        [device.name, device.model, device.description, device.owner_user]
        + [ln.directory_number for ln in device.lines]
    ).lower()
    return needle in hay


def _int(raw: str, default: int, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        return default
    return min(max(value, low), high)


def _safe_next(target: str) -> str:
    """Only a local path: never an open redirect."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
