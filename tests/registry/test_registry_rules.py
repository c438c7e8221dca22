"""The registry's rules, on a real SQLite file in a temporary directory."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from callboard.daemon.registry.model import (
    CodeState,
    Conflict,
    DeviceState,
    Line,
    NotFound,
    Onboarding,
    RegistryError,
    group_code,
    normalise_code,
    normalise_mac,
)
from callboard.daemon.registry.registry import (
    BulkError,
    DeviceSpec,
    Registry,
    RegistrySettings,
)
from callboard.daemon.registry.store import SQLiteStore


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "callboard.sqlite3"


OPENED: list[SQLiteStore] = []


def open_registry(db_path: Path, clock: FakeClock, **settings: object) -> Registry:
    store = SQLiteStore(db_path)
    OPENED.append(store)
    return Registry(store, clock, RegistrySettings(**settings))  # type: ignore[arg-type]


@pytest_twisted.async_yield_fixture(autouse=True)
async def _close_stores() -> AsyncIterator[None]:
    yield
    while OPENED:
        await OPENED.pop().close()


@pytest.fixture
def registry(db_path: Path, clock: FakeClock) -> Registry:
    return open_registry(db_path, clock)


@pytest_twisted.ensureDeferred
async def test_add_without_mac_makes_a_bat_placeholder_with_a_model_bound_code(
    registry: Registry,
) -> None:
    device = await registry.add_device(DeviceSpec(model="8841"))
    assert device.name.startswith("BAT") and len(device.name) == 15
    assert device.name[3:] == device.name[3:].upper()
    assert device.state is DeviceState.AWAITING_ACTIVATION
    code = registry.outstanding_code(device)
    assert code is not None and len(code.code) == 16 and code.code.isdigit()


@pytest_twisted.ensureDeferred
async def test_bat_code_works_only_for_its_model_and_renames_to_sep(registry: Registry) -> None:
    device = await registry.add_device(DeviceSpec(model="8841"))
    code = registry.outstanding_code(device)
    assert code is not None
    wrong = await registry.redeem(mac="00AABBCCDDEE", model="8851", code=code.code, mic_sha256="x")
    assert not wrong.ok and "model" in wrong.reason
    ok = await registry.redeem(mac="00aabbccddee", model="CP-8841", code=code.code, mic_sha256="ab")
    assert ok.ok and ok.device is not None
    assert ok.device.name == "SEP00AABBCCDDEE"
    assert ok.device.state is DeviceState.ACTIVE and ok.device.mic_sha256 == "ab"
    assert registry.find(device.name) is None
    assert registry.get("sep00aabbccddee").id == device.id


@pytest_twisted.ensureDeferred
async def test_code_is_single_use(registry: Registry) -> None:
    code = registry.outstanding_code(await registry.add_device(DeviceSpec(model="8841")))
    assert code is not None
    assert (
        await registry.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    ).ok
    again = await registry.redeem(mac="001122334466", model="8841", code=code.code, mic_sha256="")
    assert not again.ok


@pytest_twisted.ensureDeferred
async def test_sep_code_is_bound_to_the_mac(registry: Registry) -> None:
    device = await registry.add_device(DeviceSpec(model="8841", mac="00:11:22:33:44:55"))
    assert device.name == "SEP001122334455"
    code = registry.outstanding_code(device)
    assert code is not None
    other = await registry.redeem(mac="001122334466", model="8841", code=code.code, mic_sha256="")
    assert not other.ok and "MAC" in other.reason
    assert (
        await registry.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    ).ok


@pytest_twisted.ensureDeferred
async def test_code_expires_after_the_ttl(db_path: Path, clock: FakeClock) -> None:
    registry = open_registry(db_path, clock, code_ttl_hours=2)
    device = await registry.add_device(DeviceSpec(model="8841"))
    code = registry.outstanding_code(device)
    assert code is not None and code.expires_at == clock.now + 7200
    clock.now += 7200
    assert registry.outstanding_code(device) is None
    assert code.effective_state(clock.now) is CodeState.EXPIRED
    result = await registry.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    assert not result.ok and "expired" in result.reason


@pytest_twisted.ensureDeferred
async def test_release_and_generate_void_the_old_code(registry: Registry) -> None:
    device = await registry.add_device(DeviceSpec(model="8841"))
    first = registry.outstanding_code(device)
    assert first is not None
    await registry.release_code(device.name)
    assert registry.outstanding_code(device) is None
    bad = await registry.redeem(mac="001122334455", model="8841", code=first.code, mic_sha256="")
    assert not bad.ok
    with pytest.raises(NotFound):
        await registry.release_code(device.name)
    _, second = await registry.generate_code(device.name)
    _, third = await registry.generate_code(device.name)
    assert second.code != third.code
    stale = await registry.redeem(mac="001122334455", model="8841", code=second.code, mic_sha256="")
    assert not stale.ok
    assert (
        await registry.redeem(mac="001122334455", model="8841", code=third.code, mic_sha256="")
    ).ok


@pytest_twisted.ensureDeferred
async def test_generate_on_an_active_device_puts_it_back_to_awaiting(registry: Registry) -> None:
    device = await registry.add_device(DeviceSpec(model="8841", mac="001122334455"))
    code = registry.outstanding_code(device)
    assert code is not None
    await registry.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    assert registry.get(device.name).may_fetch_config
    again, _ = await registry.generate_code(device.name)
    assert again.state is DeviceState.AWAITING_ACTIVATION
    assert not again.may_fetch_config


@pytest_twisted.ensureDeferred
async def test_set_mac_renames_both_ways(registry: Registry) -> None:
    device = await registry.add_device(DeviceSpec(model="8841", requires_activation=False))
    assert device.state is DeviceState.PROVISIONED
    sep = await registry.set_mac(device.name, "001122334455")
    assert sep.name == "SEP001122334455" and sep.id == device.id
    bat = await registry.set_mac(sep.name, None)
    assert bat.name.startswith("BAT") and bat.id == device.id


@pytest_twisted.ensureDeferred
async def test_blanking_the_mac_of_an_activated_phone_requires_a_new_code(
    registry: Registry,
) -> None:
    device = await registry.add_device(DeviceSpec(model="8841", mac="001122334455"))
    code = registry.outstanding_code(device)
    assert code is not None
    await registry.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    bat = await registry.set_mac("SEP001122334455", None)
    assert bat.state is DeviceState.AWAITING_ACTIVATION
    fresh = registry.outstanding_code(bat)
    assert fresh is not None and fresh.code != code.code


@pytest_twisted.ensureDeferred
async def test_one_device_per_mac(registry: Registry) -> None:
    await registry.add_device(DeviceSpec(model="8841", mac="001122334455"))
    with pytest.raises(Conflict):
        await registry.add_device(DeviceSpec(model="8851", mac="00-11-22-33-44-55"))
    other = await registry.add_device(DeviceSpec(model="8841"))
    with pytest.raises(Conflict):
        await registry.set_mac(other.name, "001122334455")


@pytest_twisted.ensureDeferred
async def test_redeeming_a_bat_code_for_a_mac_that_is_taken_is_refused(registry: Registry) -> None:
    await registry.add_device(
        DeviceSpec(model="8841", mac="001122334455", requires_activation=False)
    )
    code = registry.outstanding_code(await registry.add_device(DeviceSpec(model="8841")))
    assert code is not None
    result = await registry.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    assert not result.ok and "already" in result.reason


@pytest_twisted.ensureDeferred
async def test_unique_directory_numbers_when_configured(db_path: Path, clock: FakeClock) -> None:
    registry = open_registry(db_path, clock, unique_directory_numbers=True)
    await registry.add_device(DeviceSpec(model="8841", lines=(Line("1001"),)))
    with pytest.raises(Conflict, match="1001"):
        await registry.add_device(DeviceSpec(model="8841", lines=(Line("1001"),)))
    lax = open_registry(db_path.with_name("other.sqlite3"), clock)
    await lax.add_device(DeviceSpec(model="8841", lines=(Line("1001"),)))
    await lax.add_device(DeviceSpec(model="8841", lines=(Line("1001"),)))


@pytest_twisted.ensureDeferred
async def test_model_default_decides_when_the_flag_is_not_given(registry: Registry) -> None:
    assert registry.onboarding("8841") is Onboarding.ACTIVATION_CODE
    await registry.set_default("8841", Onboarding.AUTOREGISTRATION)
    assert not (await registry.add_device(DeviceSpec(model="8841"))).requires_activation
    assert (
        await registry.add_device(DeviceSpec(model="8841", requires_activation=True))
    ).requires_activation
    assert (await registry.add_device(DeviceSpec(model="8851"))).requires_activation


@pytest_twisted.ensureDeferred
async def test_bulk_insert_is_all_or_nothing(registry: Registry) -> None:
    specs = [
        DeviceSpec(model="8841", mac="001122334401"),
        DeviceSpec(model="9999"),
        DeviceSpec(model="8841", mac="001122334401"),
        DeviceSpec(model="8841"),
    ]
    with pytest.raises(BulkError) as err:
        await registry.add_devices(specs)
    assert [index for index, _ in err.value.problems] == [1, 2]
    assert len(registry) == 0


@pytest_twisted.ensureDeferred
async def test_unsupported_model_and_bad_input_are_refused(registry: Registry) -> None:
    with pytest.raises(RegistryError):
        await registry.add_device(DeviceSpec(model="7960"))
    with pytest.raises(RegistryError):
        normalise_mac("00112233445")
    assert normalise_code(group_code("1234567812345678")) == "1234567812345678"
    assert not (await registry.redeem(mac="zz", model="8841", code="1" * 16, mic_sha256="")).ok


@pytest_twisted.ensureDeferred
async def test_state_survives_a_restart(db_path: Path, clock: FakeClock) -> None:
    registry = open_registry(db_path, clock)
    device = await registry.add_device(
        DeviceSpec(model="8841", lines=(Line("1001", "Alice", "alice", "pw"),), owner_user="al")
    )
    code = registry.outstanding_code(device)
    assert code is not None
    await registry.set_default("7821", Onboarding.AUTOREGISTRATION)
    reopened = open_registry(db_path, clock)
    again = reopened.get(device.name)
    assert again == device
    assert reopened.outstanding_code(again) == code
    assert reopened.onboarding("7821") is Onboarding.AUTOREGISTRATION
    assert (
        await reopened.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="m")
    ).ok
    third = open_registry(db_path, clock)
    assert third.get("SEP001122334455").state is DeviceState.ACTIVE
    current = third.current_code(third.get("SEP001122334455"))
    assert current is not None and current.state is CodeState.USED


@pytest_twisted.ensureDeferred
async def test_database_is_owner_only(db_path: Path, clock: FakeClock) -> None:
    open_registry(db_path, clock)
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


@pytest_twisted.ensureDeferred
async def test_listeners_hear_renames(registry: Registry) -> None:
    heard: list[tuple[str | None, str | None]] = []
    registry.subscribe(lambda old, new: heard.append((old and old.name, new and new.name)))
    device = await registry.add_device(DeviceSpec(model="8841", requires_activation=False))
    await registry.set_mac(device.name, "001122334455")
    await registry.delete("SEP001122334455")
    assert heard == [
        (None, device.name),
        (device.name, "SEP001122334455"),
        ("SEP001122334455", None),
    ]


@pytest_twisted.ensureDeferred
async def test_a_directory_number_is_in_use_while_any_device_holds_it(
    db_path: Path, clock: FakeClock
) -> None:
    """The index counts the devices on each number: shared, changed, deleted, reloaded."""
    registry = open_registry(db_path, clock)
    first = await registry.add_device(DeviceSpec(model="8841", lines=(Line("1001"), Line("1002"))))
    second = await registry.add_device(DeviceSpec(model="8841", lines=(Line("1001"),)))
    assert registry.directory_number_in_use("1001") and registry.directory_number_in_use("1002")
    await registry.delete(first.name)
    assert registry.directory_number_in_use("1001")  # the second device still has it
    assert not registry.directory_number_in_use("1002")
    await registry.update_device(second.name, lines=[Line("2001", "Renamed")])
    assert not registry.directory_number_in_use("1001")
    await registry.update_device(second.name, description="same lines, new version")
    assert registry.directory_number_in_use("2001")
    reloaded = open_registry(db_path, clock)
    assert reloaded.directory_number_in_use("2001")
    assert not reloaded.directory_number_in_use("1001")
    await reloaded.delete(second.name)
    assert not reloaded.directory_number_in_use("2001")
