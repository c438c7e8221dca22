"""Held files and their freshness: the inotify watch of the root, and its safety net.

The rest of DirectorySource's contract (every change kind read again at once, with the watch
and without it) is pinned in tests/http/test_directory_source.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from callboard.protocols import filesource
from callboard.protocols.filesource import DirectorySource, FileNotFound, HeldBody, Requester

WHO = Requester("127.0.0.1", 1, "tftp")


def read(source: DirectorySource, name: str) -> bytes:
    body = source.open(name, WHO)
    try:
        return body.read_at(0, body.size)
    finally:
        body.close()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lstat_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``os.lstat`` is asked about from here on (the file source's freshness check)."""
    calls: list[str] = []
    real = os.lstat

    def counting(path: Any, *args: Any, **kw: Any) -> os.stat_result:
        if str(path).endswith(".bin"):  # not realpath()'s walk over the root's parents
            calls.append(str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(filesource.os, "lstat", counting)
    return calls


@linux_only
def test_with_the_watch_an_unchanged_held_file_costs_no_lstat_until_the_recheck(
    tmp_path: Path, lstat_calls: list[str]
) -> None:
    (tmp_path / "top.bin").write_bytes(b"top")
    clock = Clock()
    source = DirectorySource(str(tmp_path), now=clock)
    held = source.open("top.bin", WHO)
    assert isinstance(held, HeldBody)
    for _ in range(100):
        assert source.open("top.bin", WHO) is held
    assert lstat_calls == []
    clock.now += DirectorySource.recheck_after  # the safety net: one lstat per second
    assert source.open("top.bin", WHO) is held
    assert source.open("top.bin", WHO) is held
    assert len(lstat_calls) == 1
    without = DirectorySource(str(tmp_path), watch=False)
    without.open("top.bin", WHO)
    without.open("top.bin", WHO)
    assert len(lstat_calls) == 2  # without the watch, every request after the first checks


@linux_only
def test_a_change_inotify_cannot_see_is_served_within_the_recheck_bound(tmp_path: Path) -> None:
    """A write through a hard link outside the root is reported to that other directory only."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "elsewhere.bin").write_bytes(b"old!")
    os.link(tmp_path / "elsewhere.bin", root / "top.bin")
    clock = Clock()
    source = DirectorySource(str(root), now=clock)
    held = source.open("top.bin", WHO)
    with (tmp_path / "elsewhere.bin").open("r+b") as fh:
        fh.write(b"new!")
    assert source.open("top.bin", WHO) is held  # not seen yet: within the bound
    clock.now += DirectorySource.recheck_after - 0.01
    assert source.open("top.bin", WHO) is held
    clock.now += 0.01
    assert read(source, "top.bin") == b"new!"


@linux_only
@pytest.mark.parametrize("change", ["rewrite", "replace", "chmod", "remove"])
def test_with_the_watch_a_change_in_the_root_is_served_at_once(
    tmp_path: Path, change: str, lstat_calls: list[str]
) -> None:
    """No clock moves: the change is seen because the kernel queued its event, not by time."""
    path = tmp_path / "top.bin"
    path.write_bytes(b"top")
    source = DirectorySource(str(tmp_path), now=Clock())
    held = source.open("top.bin", WHO)
    (tmp_path / "other.bin").write_bytes(b"other")  # an unrelated change forgets nothing
    assert source.open("top.bin", WHO) is held
    if change == "rewrite":
        path.write_bytes(b"TOP")
    elif change == "replace":
        (tmp_path / "new.bin").write_bytes(b"new")
        (tmp_path / "new.bin").rename(path)
    elif change == "chmod":
        path.chmod(0o600)
    else:
        path.unlink()
        with pytest.raises(FileNotFound):
            source.open("top.bin", WHO)
        return
    body = source.open("top.bin", WHO)
    assert body is not held
    assert read(source, "top.bin") == {"rewrite": b"TOP", "replace": b"new"}.get(change, b"top")
    assert lstat_calls == []


@linux_only
def test_when_the_root_is_moved_away_the_watch_ends_and_lstat_takes_over(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "top.bin").write_bytes(b"first")
    source = DirectorySource(str(root), now=Clock())
    assert read(source, "top.bin") == b"first"
    root.rename(tmp_path / "old-root")
    root.mkdir()
    (root / "top.bin").write_bytes(b"second")
    assert read(source, "top.bin") == b"second"
    assert source._watch is None
    (root / "top.bin").write_bytes(b"third!")
    assert read(source, "top.bin") == b"third!"


@linux_only
def test_many_queued_events_are_all_read_and_only_the_changed_names_forgotten(
    tmp_path: Path,
) -> None:
    """More events than one read takes (64 KiB): a change among them is not missed."""
    (tmp_path / "top.bin").write_bytes(b"top")
    (tmp_path / "keep.bin").write_bytes(b"keep")
    source = DirectorySource(str(tmp_path), now=Clock())
    held, kept = source.open("top.bin", WHO), source.open("keep.bin", WHO)
    name = "n" * 200  # events of 216 bytes or so: 2,000 of them fill several reads
    for n in range(2000):
        (tmp_path / f"{name}{n}").write_bytes(b"")
    (tmp_path / "top.bin").write_bytes(b"TOP")  # the last event of all
    assert read(source, "top.bin") == b"TOP"
    assert source.open("top.bin", WHO) is not held and source.open("keep.bin", WHO) is kept
