"""The write-behind of SIP bindings on its own: coalesced, bucketed, kept through failures.

A real SQLite file and the real journal thread; the flushes are called by the test (the
service's 0.5 s timer is not started), so each can be counted.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from callboard.daemon.bindings import EXPIRY_BUCKET, BindingsSync, SharedLocationService
from callboard.daemon.registry.bindings import BindingJournal, open_binding_journal
from callboard.daemon.registry.store import SQLiteStore
from callboard.protocols.sip.location import Binding
from twisted.internet import defer, reactor

NOW = 1_800_000_000.0  # on a bucket boundary (a multiple of 30)


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def binding(aor: str, expires_at: float, device: str = "SEP001122334455") -> Binding:
    return Binding(
        aor=aor,
        key="k",
        contact=f"<sip:{aor[4:8]}@192.0.2.1>",
        call_id="cid",
        cseq=1,
        expires_at=expires_at,
        registered_at=NOW,
        device_name=device,
        transport="udp",
        source="192.0.2.1:5060",
        user_agent="Cisco-CP8841",
        client_cert_fingerprint=None,
    )


def rows(path: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT node, aor, expires_at FROM bindings ORDER BY aor").fetchall()
    finally:
        db.close()


class Fixture:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = Clock()
        self.location = SharedLocationService()
        self.journal: BindingJournal = open_binding_journal(
            f"sqlite://{path}", path.parent, reactor
        )
        self.sync = BindingsSync(self.location, self.journal, "node-a", self.clock, reactor)

    async def flush(self) -> None:
        await self.sync.flush().addTimeout(10, reactor)


@pytest_twisted.async_yield_fixture
async def fx(tmp_path: Path) -> AsyncIterator[Fixture]:
    path = tmp_path / "r.sqlite3"
    await SQLiteStore(path).close()  # creates the schema
    f = Fixture(path)
    yield f
    await f.journal.close()


@pytest_twisted.ensureDeferred
async def test_a_refresh_storm_is_written_once_per_expiry_bucket(fx: Fixture) -> None:
    aor = "sip:1001@127.0.0.1"
    fx.location.replace(aor, {"k": binding(aor, NOW + 3601)})
    await fx.flush()
    assert fx.journal.transactions == 1
    assert rows(fx.path) == [("node-a", aor, NOW + 3600 + EXPIRY_BUCKET)]  # rounded up
    # 1000 refreshes, each flushed on its own, the expiry moving inside its bucket: no write.
    for i in range(1000):
        fx.clock.t = NOW + 1 + i * (EXPIRY_BUCKET - 2) / 1000
        b = binding(aor, fx.clock.t + 3600).replace(cseq=i + 2, registered_at=fx.clock.t)
        fx.location.replace(aor, {"k": b})
        await fx.flush()
    assert fx.journal.transactions == 1
    # Into the next bucket: one write, the stored expiry rounded up (never before the real).
    fx.clock.t = NOW + EXPIRY_BUCKET + 1
    fx.location.replace(aor, {"k": binding(aor, fx.clock.t + 3600)})
    await fx.flush()
    assert fx.journal.transactions == 2
    ((_, _, stored),) = rows(fx.path)
    assert fx.clock.t + 3600 <= float(stored) < fx.clock.t + 3600 + EXPIRY_BUCKET  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_many_changes_between_flushes_are_one_transaction(fx: Fixture) -> None:
    for n in range(500):
        aor = f"sip:{2000 + n}@127.0.0.1"
        for step in range(3):  # changed three times before the flush: written once
            fx.location.replace(aor, {"k": binding(aor, NOW + 60 * (step + 1))})
    await fx.flush()
    assert fx.journal.transactions == 1 and len(rows(fx.path)) == 500
    # Unregistration, expiry and re-onboarding remove the rows.
    fx.location.replace("sip:2000@127.0.0.1", {})
    fx.location.replace("sip:2001@127.0.0.1", {"k": binding("sip:2001@127.0.0.1", NOW + 1)})
    fx.location.replace(
        "sip:2002@127.0.0.1", {"k": binding("sip:2002@127.0.0.1", NOW + 60, device="SEPOTHER")}
    )
    await fx.flush()
    fx.clock.t = NOW + 2
    assert len(fx.location.sweep(fx.clock.t)) == 1  # 2001 expired
    assert len(fx.location.remove_device("SEPOTHER")) == 1  # 2002's device re-onboarded
    await fx.flush()
    left = {aor for _, aor, _ in rows(fx.path)}
    assert len(left) == 497
    assert not left & {"sip:2000@127.0.0.1", "sip:2001@127.0.0.1", "sip:2002@127.0.0.1"}


@pytest_twisted.ensureDeferred
async def test_a_failed_write_is_kept_and_written_when_the_database_returns(
    fx: Fixture,
) -> None:
    aor = "sip:3000@127.0.0.1"
    real_connect = fx.journal._side._connect

    def broken() -> object:
        raise sqlite3.OperationalError("database is away")

    fx.journal._side._connect = broken
    fx.location.replace(aor, {"k": binding(aor, NOW + 3600)})
    await fx.flush()  # fails: logged, kept
    assert rows(fx.path) == [] and aor in fx.location.dirty
    fx.journal._side._connect = real_connect
    await fx.flush()
    assert rows(fx.path) == [("node-a", aor, NOW + 3600)]
    # Another node's reads leave this process's own rows out of "others".
    others = await fx.journal.of_device("SEP001122334455", NOW, fx.sync.holder)
    assert others == []
    counts = await fx.journal.count_by_node(NOW)
    assert counts == {"node-a": 1}
    await defer.succeed(None)
