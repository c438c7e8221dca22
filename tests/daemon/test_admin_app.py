"""The admin application layer: who may do what, what is audited, how refusals look."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import structlog
from callboard.daemon.admin import views
from callboard.daemon.admin.app import Actor, AdminApp, Problem, problem_from
from callboard.daemon.admin.csvio import ImportRow
from callboard.daemon.registry.model import Onboarding, Stale
from callboard.daemon.registry.registry import DeviceSpec, Registry

ADMIN = Actor(name="alice", is_admin=True, via="test", uid=1000)
VIEWER = Actor(name="bob", is_admin=False, via="https-token")


@pytest.fixture
def app(registry: Registry) -> AdminApp:
    return AdminApp(registry, lambda name: [{"aor": f"1001 of {name}"}], lambda: {"tvs": ["x"]})


async def refused(d: Any) -> Problem:
    with pytest.raises(Problem) as caught:
        await d
    return caught.value


@pytest_twisted.ensureDeferred
async def test_an_admin_change_is_audited_with_the_actor_and_no_code(app: AdminApp) -> None:
    with structlog.testing.capture_logs() as logs:
        view = await app.add_device(ADMIN, DeviceSpec(model="8841"))
    assert view.reveal_code and view.code is not None
    (entry,) = [e for e in logs if e["event"] == "admin change"]
    assert entry["action"] == "device.add" and entry["device"] == view.device.name
    assert (entry["actor"], entry["actor_uid"], entry["via"]) == ("alice", 1000, "test")
    assert view.code.code not in repr(entry)


@pytest_twisted.ensureDeferred
async def test_a_non_admin_may_read_but_not_change_or_see_codes(
    app: AdminApp, registry: Registry
) -> None:
    name = (await app.add_device(ADMIN, DeviceSpec(model="8841"))).device.name
    listed = await app.list_devices(VIEWER)
    assert [v.device.name for v in listed] == [name] and not listed[0].reveal_code
    shown = await app.show_device(VIEWER, name)
    assert shown.registrations == [{"aor": f"1001 of {name}"}]
    with structlog.testing.capture_logs() as logs:
        for attempt in (
            app.add_device(VIEWER, DeviceSpec(model="8841")),
            app.delete_device(VIEWER, name),
            app.generate_code(VIEWER, name),
            app.release_code(VIEWER, name),
            app.set_mac(VIEWER, name, "001122334455"),
            app.set_requires_activation(VIEWER, name, False),
            app.set_default(VIEWER, "8841", Onboarding.AUTOREGISTRATION),
            app.import_devices(VIEWER, [ImportRow(2, {"model": "8841"})], dummy_mac=True),
            app.view_code(VIEWER, name),
            app.export_codes(VIEWER),
        ):
            problem = await refused(attempt)
            assert problem.status == 403 and problem.title == "Forbidden"
    assert [e for e in logs if e["event"] == "admin change"] == []
    assert len(registry) == 1 and registry.onboarding("8841") is Onboarding.ACTIVATION_CODE


@pytest_twisted.ensureDeferred
async def test_registry_refusals_become_problems(app: AdminApp) -> None:
    assert (await refused(app.show_device(ADMIN, "SEP001122334455"))).status == 404
    assert (await refused(app.add_device(ADMIN, DeviceSpec(model="7960")))).status == 400
    await app.add_device(ADMIN, DeviceSpec(model="8841", mac="001122334455"))
    conflict = await refused(app.add_device(ADMIN, DeviceSpec(model="8841", mac="001122334455")))
    assert conflict.status == 409 and "already exists" in conflict.detail
    stale = problem_from(Stale("SEP001122334455 was changed meanwhile; try again"))
    assert stale is not None and (stale.status, stale.title) == (409, "Conflict")
    assert problem_from(RuntimeError("disk full")) is None  # an internal failure, not a refusal


@pytest_twisted.ensureDeferred
async def test_an_import_lists_every_bad_row_by_line(app: AdminApp, registry: Registry) -> None:
    rows = [
        ImportRow(2, {"mac": "001122334401", "model": "8841"}),
        ImportRow(3, {"mac": "", "model": "8841"}),  # blank MAC without dummy_mac
        ImportRow(4, {"mac": "001122334401", "model": "8841"}),  # the same MAC again
        ImportRow(5, {"mac": "001122334402", "model": "9999"}),
    ]
    problem = await refused(app.import_devices(ADMIN, rows, dummy_mac=False))
    assert problem.status == 422
    assert [p["line"] for p in problem.extensions["problems"]] == [3, 4, 5]
    assert len(registry) == 0
    body = views.problem_json(problem)
    assert body["status"] == 422 and body["title"] == "Invalid rows"
    assert body["type"] == "about:blank" and body["detail"] == "3 bad row(s); nothing was imported"
    assert views.error_json(problem)["error"] == body["detail"]
    result = await app.import_devices(ADMIN, rows[:1], dummy_mac=False)
    assert [d.name for d in result.devices] == ["SEP001122334401"]


@pytest_twisted.ensureDeferred
async def test_code_views_reveal_digits_only_where_meant(app: AdminApp) -> None:
    name = (await app.add_device(ADMIN, DeviceSpec(model="8841"))).device.name
    shown = await app.view_code(ADMIN, name)
    assert shown.reveal and "code" in views.code_view_json(shown)
    released = await app.release_code(ADMIN, name)
    body = views.code_view_json(released)
    assert "code" not in body and body["state"] == "released"
    generated = await app.generate_code(ADMIN, name)
    assert views.code_view_json(generated)["code"].count("-") == 3
    exported = await app.export_codes(ADMIN)
    assert [d.name for d, _ in exported] == [name]
    problem = await refused(app.release_code(ADMIN, "SEP0000000000FF"))
    assert problem.status == 404
