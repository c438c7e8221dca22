"""AdminApp: editing a device, and a device's user checked against the known users."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import structlog
from callboard.daemon.admin.app import Actor, AdminApp, Problem
from callboard.daemon.admin.csvio import ImportRow
from callboard.daemon.registry.model import Line
from callboard.daemon.registry.registry import DeviceSpec, Registry

ADMIN = Actor(name="alice", is_admin=True, via="test")
VIEWER = Actor(name="bob", is_admin=False, via="web-session")
USERS = {"alice", "carol"}


@pytest.fixture
def app(registry: Registry) -> AdminApp:
    return AdminApp(registry, known_user=USERS.__contains__)


async def refused(d: Any) -> Problem:
    with pytest.raises(Problem) as caught:
        await d
    return caught.value


@pytest_twisted.ensureDeferred
async def test_edit_changes_description_user_and_lines_and_is_audited(
    app: AdminApp, registry: Registry
) -> None:
    spec = DeviceSpec(model="8841", lines=(Line("1001", "Old", "", "s3cret-pw"),))
    name = (await app.add_device(ADMIN, spec)).device.name
    with structlog.testing.capture_logs() as logs:
        view = await app.update_device(
            ADMIN,
            name,
            description="Lobby",
            owner_user="carol",
            lines=[Line("1001", "Lobby"), Line("1002", "Second", "", "other-pw")],
        )
    d = view.device
    assert (d.description, d.owner_user) == ("Lobby", "carol") and not view.reveal_code
    # A line sent back without a password keeps its number's password; a new one is taken.
    assert [(ln.directory_number, ln.auth_password) for ln in d.lines] == [
        ("1001", "s3cret-pw"),
        ("1002", "other-pw"),
    ]
    (entry,) = [e for e in logs if e["event"] == "admin change"]
    assert entry["action"] == "device.update" and entry["actor"] == "alice"
    assert entry["changed"] == ["description", "user", "lines"] and entry["owner"] == "carol"
    assert "s3cret" not in repr(entry) and "other-pw" not in repr(entry)
    assert registry.get(name).owner_user == "carol"


@pytest_twisted.ensureDeferred
async def test_an_unknown_user_is_refused_and_nothing_changes(
    app: AdminApp, registry: Registry
) -> None:
    problem = await refused(app.add_device(ADMIN, DeviceSpec(model="8841", owner_user="zed")))
    assert problem.status == 400 and "no user named 'zed'" in problem.detail
    assert len(registry) == 0
    name = (await app.add_device(ADMIN, DeviceSpec(model="8841", owner_user="alice"))).device.name
    problem = await refused(app.update_device(ADMIN, name, owner_user="zed"))
    assert problem.status == 400 and registry.get(name).owner_user == "alice"
    rows = [
        ImportRow(2, {"model": "8841", "user": "carol"}),
        ImportRow(3, {"model": "8841", "user": "nobody"}),
    ]
    problem = await refused(app.import_devices(ADMIN, rows, dummy_mac=True))
    assert problem.status == 422
    assert problem.extensions["problems"] == [
        {"line": 3, "message": "no user named 'nobody'; add the user first"}
    ]
    assert len(registry) == 1
    # A blank user is no user, and is always fine.
    assert (await app.update_device(ADMIN, name, owner_user="")).device.owner_user == ""


@pytest_twisted.ensureDeferred
async def test_edit_needs_an_admin_and_an_existing_device(app: AdminApp) -> None:
    name = (await app.add_device(ADMIN, DeviceSpec(model="8841"))).device.name
    assert (await refused(app.update_device(VIEWER, name, description="x"))).status == 403
    missing = await refused(app.update_device(ADMIN, "BAT000000000000", description="x"))
    assert missing.status == 404
    problem = await refused(app.update_device(ADMIN, name, lines=[Line("1"), Line("1")]))
    assert problem.status == 400 and "twice" in problem.detail


@pytest_twisted.ensureDeferred
async def test_without_known_users_any_name_is_taken(registry: Registry) -> None:
    app = AdminApp(registry)
    view = await app.add_device(ADMIN, DeviceSpec(model="8841", owner_user="anyone"))
    assert view.device.owner_user == "anyone"
