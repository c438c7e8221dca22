"""The web front door's plumbing: routing on ``twisted.web``, responses, security headers.

One leaf :class:`WebRoot` takes every request, matches it against a route table (method and
path pattern), runs the handler (a coroutine awaiting Deferreds, so nothing blocks) and
writes its :class:`Response` with the security headers every answer carries. A handler
refuses by raising :class:`~callboard.daemon.admin.app.Problem`; how it is shown (an HTML
page, a redirect to sign-in, RFC 9457 problem JSON) is the area's choice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import ensureDeferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..admin.app import Actor, Problem
from ..logs import get_logger
from .sessions import COOKIE, Session

log = get_logger("callboard.web")

MAX_BODY = 8 * 1024 * 1024

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def redirect(location: str, status: int = 303) -> Response:
    return Response(status, b"", "text/plain; charset=utf-8", {"Location": location})


def json_response(body: Any, status: int = 200) -> Response:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(status, data, "application/json")


def problem_response(problem: Problem) -> Response:
    """RFC 9457 ``application/problem+json``."""
    body: dict[str, Any] = {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        **problem.extensions,
    }
    response = json_response(body, problem.status)
    response.content_type = "application/problem+json"
    if problem.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="callboard"'
    return response


@dataclass
class Ctx:
    """One request as a handler sees it."""

    request: Request
    now: float
    params: dict[str, str]
    session: Session | None = None
    actor: Actor | None = None
    read_only: bool = False
    via_cookie: bool = False
    new_cookie: str | None = None  # set when the session id changes

    @property
    def method(self) -> str:
        return (self.request.method or b"GET").decode("latin-1")

    @property
    def path(self) -> str:
        return (self.request.path or b"/").decode("utf-8", "replace")

    def query(self, name: str, default: str = "") -> str:
        values = (self.request.args or {}).get(name.encode())
        return _text(values[0]) if values else default

    def form(self, name: str, default: str = "") -> str:
        return self.query(name, default)

    def form_bytes(self, name: str) -> bytes | None:
        values = (self.request.args or {}).get(name.encode())
        return values[0] if values else None

    def header(self, name: str) -> str:
        value = self.request.getHeader(name)
        return value or ""

    def body(self) -> bytes:
        content = self.request.content
        if content is None:
            return b""
        content.seek(0)
        data: bytes = content.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise Problem(413, "Payload too large", f"the body exceeds {MAX_BODY} bytes")
        return data

    def json_body(self) -> Any:
        kind = self.header("content-type").split(";")[0].strip().lower()
        if kind not in ("application/json", ""):
            raise Problem(415, "Unsupported media type", "send the body as application/json")
        raw = self.body()
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise Problem.bad_request("the request body is not valid JSON") from None

    @property
    def source(self) -> str:
        peer = self.request.getClientAddress()
        return str(getattr(peer, "host", "unknown"))


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


Handler = Callable[[Ctx], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str  # "/api/v1/devices/{name}"
    handler: Handler
    regex: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        rx = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$"
        object.__setattr__(self, "regex", re.compile(rx))


class Area:
    """A part of the site (a path prefix) with its routes and its way to show refusals."""

    prefix = "/"

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        def add(handler: Handler) -> Handler:
            self.routes.append(Route(method, pattern, handler))
            return handler

        return add

    async def prepare(self, ctx: Ctx) -> None:
        """Authenticate (sets ``ctx.actor``) and check CSRF; raise a Problem to refuse."""

    def refusal(self, ctx: Ctx, problem: Problem) -> Response:
        return problem_response(problem)

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """The route, its path parameters, and whether the path exists for another method."""
        other = False
        for route in self.routes:
            m = route.regex.match(path)
            if m is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, {k: _unquote(v) for k, v in m.groupdict().items()}, False
            other = True
        return None, {}, other


def _unquote(value: str) -> str:
    from urllib.parse import unquote

    return unquote(value)


class WebRoot(Resource):
    """Every request of the HTTPS listener."""

    isLeaf = True

    def __init__(
        self,
        areas: list[Area],
        clock: Callable[[], float],
        security_headers: Mapping[str, str],
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.areas = sorted(areas, key=lambda a: -len(a.prefix))
        self.clock = clock
        self.security_headers = dict(security_headers)

    def render(self, request: Request) -> Any:
        for name, value in self.security_headers.items():
            request.setHeader(name, value)
        d = ensureDeferred(self._answer(request))
        d.addErrback(self._crashed, request)
        d.addCallback(self._write, request)
        return NOT_DONE_YET

    async def _answer(self, request: Request) -> tuple[Response, Ctx | None]:
        raw_path = (request.path or b"/").decode("utf-8", "replace")
        method = (request.method or b"GET").decode("latin-1")
        area = next((a for a in self.areas if raw_path.startswith(a.prefix)), None)
        ctx = Ctx(request, self.clock(), {})
        if area is None:
            return problem_response(Problem.not_found("no such page")), ctx
        route, params, other = area.match(method, raw_path)
        try:
            if route is None:
                if other:
                    raise Problem(405, "Method not allowed", f"{method} is not allowed here")
                raise Problem.not_found(f"no such page: {raw_path}")
            ctx.params = params
            await area.prepare(ctx)
            return await route.handler(ctx), ctx
        except Problem as problem:
            return area.refusal(ctx, problem), ctx

    def _crashed(self, failure: Failure, request: Request) -> tuple[Response, None]:
        log.error(
            "web request failed",
            path=(request.path or b"").decode("utf-8", "replace")[:200],
            error=failure.getErrorMessage()[:300],
            error_type=failure.type.__name__ if failure.type else "?",
        )
        failure.printTraceback()
        problem = Problem(500, "Internal error", "the server failed; see its log")
        return problem_response(problem), None

    def _write(self, result: tuple[Response, Ctx | None], request: Request) -> None:
        response, ctx = result
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.setResponseCode(response.status)
        request.setHeader("Content-Type", response.content_type)
        for name, value in response.headers.items():
            request.setHeader(name, value)
        if ctx is not None and ctx.new_cookie is not None:
            request.addCookie(
                COOKIE,
                ctx.new_cookie,
                path="/",
                secure=True,
                httpOnly=True,
                sameSite="strict",
            )
        if request.method != b"HEAD":
            request.write(response.body)
        request.finish()


def sign_in_location(path: str) -> str:
    return "/sign-in?next=" + quote(path, safe="/")
