"""DirectorySource: the one-open fast path and the resolving path agree on every name."""

from __future__ import annotations

from pathlib import Path

import pytest
from callboard.protocols.filesource import (
    AccessViolation,
    DirectorySource,
    DiskBody,
    FileNotFound,
    HeldBody,
    Requester,
    normalise_name,
)

WHO = Requester("127.0.0.1", 1, "tftp")


@pytest.fixture(params=["inotify", "lstat"])
def source(tmp_path: Path, request: pytest.FixtureRequest) -> DirectorySource:
    """Every test twice: held files kept fresh by the inotify watch, and by lstat alone."""
    root = tmp_path / "root"
    (root / "loads").mkdir(parents=True)
    (root / "top.bin").write_bytes(b"top")
    (root / "loads" / "deep.bin").write_bytes(b"deep")
    (root / "alias.bin").symlink_to(root / "loads" / "deep.bin")  # stays inside: served
    (tmp_path / "secret").write_bytes(b"secret")
    (root / "escape.bin").symlink_to(tmp_path / "secret")  # leaves the root: refused
    (root / "loads" / "escape2.bin").symlink_to(tmp_path / "secret")
    (root / "outside").symlink_to(tmp_path)  # a directory link out of the root
    return DirectorySource(str(root), watch=request.param == "inotify")


def read(source: DirectorySource, name: str) -> bytes:
    body = source.open(name, WHO)
    try:
        return body.read_at(0, body.size)
    finally:
        body.close()


def test_files_and_in_root_symlinks_are_served(source: DirectorySource) -> None:
    assert read(source, "top.bin") == b"top"
    assert read(source, "/loads/deep.bin") == b"deep"
    assert read(source, "alias.bin") == b"deep"


@pytest.mark.parametrize("name", ["escape.bin", "loads/escape2.bin", "outside/secret", "loads"])
def test_escapes_and_directories_are_access_violations(source: DirectorySource, name: str) -> None:
    with pytest.raises(AccessViolation):
        source.open(name, WHO)


@pytest.mark.parametrize("name", ["missing.bin", "loads/missing.bin", "top.bin/x"])
def test_missing_files_are_not_found(source: DirectorySource, name: str) -> None:
    with pytest.raises(FileNotFound):
        source.open(name, WHO)


# -- small top-level files held in memory ------------------------------------------------------


def test_a_small_top_level_file_is_held_and_shared_while_unchanged(source: DirectorySource) -> None:
    first = source.open("top.bin", WHO)
    assert isinstance(first, HeldBody) and first.data == b"top"
    again = source.open("/TOP.bin".lower(), WHO)
    assert again is first
    assert first.identity() == DiskBody(str(Path(source.root) / "top.bin")).identity()


@pytest.mark.parametrize("change", ["rewrite", "replace", "chmod", "symlink", "remove", "grow"])
def test_a_held_file_that_changes_on_disk_is_read_again(
    source: DirectorySource, change: str
) -> None:
    path = Path(source.root) / "top.bin"
    held = source.open("top.bin", WHO)
    if change == "rewrite":
        path.write_bytes(b"TOP")  # same size: the change times tell
    elif change == "replace":
        (Path(source.root) / "new.bin").write_bytes(b"new")
        (Path(source.root) / "new.bin").rename(path)
    elif change == "chmod":
        path.chmod(0o600)
    elif change == "symlink":
        path.unlink()
        path.symlink_to(Path(source.root) / "loads" / "deep.bin")
    elif change == "remove":
        path.unlink()
        with pytest.raises(FileNotFound):
            source.open("top.bin", WHO)
        return
    else:
        path.write_bytes(b"x" * 100_000)  # past the bound: served lazily, not held
    body = source.open("top.bin", WHO)
    assert body is not held
    expected = {"rewrite": b"TOP", "replace": b"new", "chmod": b"top", "symlink": b"deep"}
    assert read(source, "top.bin") == expected.get(change, b"x" * 100_000)
    assert isinstance(body, HeldBody) == (change in ("rewrite", "replace", "chmod"))


def test_symlinks_deeper_names_and_large_files_are_never_held(source: DirectorySource) -> None:
    (Path(source.root) / "big.bin").write_bytes(b"b" * 65537)
    for name in ("alias.bin", "loads/deep.bin", "big.bin"):
        body = source.open(name, WHO)
        assert not isinstance(body, HeldBody)
        body.close()


def test_held_files_stay_within_their_budget(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"f{i}.bin").write_bytes(bytes([i]) * 1000)
    source = DirectorySource(str(tmp_path), held_budget=3500)
    for i in range(10):
        assert read(source, f"f{i}.bin") == bytes([i]) * 1000
    assert source._held_bytes <= 3500 and len(source._held) <= 3
    assert read(source, "f9.bin") == bytes([9]) * 1000
    nothing = DirectorySource(str(tmp_path), hold_up_to=0)
    assert not isinstance(nothing.open("f1.bin", WHO), HeldBody)


@pytest.mark.parametrize("name", ["a//./b", "/" + "d/" * 200 + "f", "x/../y", "\\" * 300, "a\x00"])
def test_long_and_short_names_are_normalised_alike(name: str) -> None:
    def outcome(raw: str) -> str:
        try:
            return normalise_name(raw)
        except (AccessViolation, FileNotFound) as exc:
            return type(exc).__name__

    assert outcome(name) == outcome(name) == outcome(name + "/.")
    assert normalise_name("/" + "d/" * 200 + "f") == "d/" * 200 + "f"
