"""DirectorySource: the one-open fast path and the resolving path agree on every name."""

from __future__ import annotations

from pathlib import Path

import pytest
from callboard.protocols.filesource import (
    AccessViolation,
    DirectorySource,
    FileNotFound,
    Requester,
)

WHO = Requester("127.0.0.1", 1, "tftp")


@pytest.fixture
def source(tmp_path: Path) -> DirectorySource:
    root = tmp_path / "root"
    (root / "loads").mkdir(parents=True)
    (root / "top.bin").write_bytes(b"top")
    (root / "loads" / "deep.bin").write_bytes(b"deep")
    (root / "alias.bin").symlink_to(root / "loads" / "deep.bin")  # stays inside: served
    (tmp_path / "secret").write_bytes(b"secret")
    (root / "escape.bin").symlink_to(tmp_path / "secret")  # leaves the root: refused
    (root / "loads" / "escape2.bin").symlink_to(tmp_path / "secret")
    (root / "outside").symlink_to(tmp_path)  # a directory link out of the root
    return DirectorySource(str(root))


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
