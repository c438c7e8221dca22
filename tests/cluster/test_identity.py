"""One cluster identity: ``callboard certs export`` on node A, ``certs import`` on node B.

Both nodes then serve byte-identical ``ITLFile.tlv`` (fetched with curl and tftp-hpa), so a
phone moves between them without an ITL mismatch. Bad bundles and wrong passphrases are
one-line errors with a non-zero exit, and the passphrase never shows.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import pytest
from callboard.daemon import bundle, certs
from callboard.daemon.edge.tokens import load_or_create_signing_key
from callboard.daemon.main import build_parser
from support.harness import CALLBOARD, Daemon

PASSPHRASE = "staple battery horse"


def cli_stdin(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with the passphrase on stdin, as an operator pipes it."""
    return subprocess.run(
        [*CALLBOARD, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def export(state: Path, out: Path, passphrase: str = PASSPHRASE) -> None:
    result = cli_stdin(passphrase + "\n", "certs", "export", str(out), "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert passphrase not in result.stdout + result.stderr


def import_(
    state: Path, src: Path, passphrase: str = PASSPHRASE
) -> subprocess.CompletedProcess[str]:
    return cli_stdin(passphrase + "\n", "certs", "import", str(src), "--state-dir", str(state))


def one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert PASSPHRASE not in result.stdout + result.stderr


def curl_itl(daemon: Daemon) -> bytes:
    return subprocess.run(
        ["curl", "-sf", f"http://127.0.0.1:{daemon.port('http')}/ITLFile.tlv"],
        capture_output=True, check=True, timeout=30,
    ).stdout  # fmt: skip


def tftp_itl(daemon: Daemon, out: Path) -> bytes:
    subprocess.run(
        ["tftp", "-m", "binary", "127.0.0.1", str(daemon.port("tftp")), "-c", "get",
         "ITLFile.tlv", str(out)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return out.read_bytes()


def local_itl(state: Path) -> bytes:
    server = certs.load_server_certs(state)
    return server.build_itl(timestamp=server.itl_timestamp())


def in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stdin: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """The same parser and handler as the command, without a new interpreter per call."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    parsed = build_parser().parse_args(list(args))
    code = parsed.func(parsed)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_an_imported_identity_serves_the_same_itl_on_both_nodes(
    daemon_factory: Any, tmp_path: Path
) -> None:
    a_state, b_state, c_state = (tmp_path / n for n in ("node-a", "node-b", "node-c"))
    certs.init_certs(a_state)
    load_or_create_signing_key(a_state / "certs" / "edge-token.key")  # the edge's JWT key
    certs.init_certs(b_state)  # B's own identity, replaced by the import
    export(a_state, tmp_path / "identity.cbid")
    blob = (tmp_path / "identity.cbid").read_bytes()
    assert b"PRIVATE KEY" not in blob and b"CERTIFICATE" not in blob
    assert (tmp_path / "identity.cbid").stat().st_mode & 0o777 == 0o600
    result = import_(b_state, tmp_path / "identity.cbid")
    assert result.returncode == 0, result.stderr
    for name in (*bundle.IDENTITY_FILES, "edge-token.key"):
        assert (b_state / "certs" / name).read_bytes() == (a_state / "certs" / name).read_bytes()
        if name.endswith(".key"):
            assert (b_state / "certs" / name).stat().st_mode & 0o777 == 0o600
    assert not list((b_state / "certs").glob(".import-*"))  # the staging directory is gone

    a = daemon_factory(state_dir=a_state)
    b = daemon_factory(state_dir=b_state)
    itl_a = curl_itl(a)
    assert itl_a == curl_itl(b)
    assert itl_a == tftp_itl(a, tmp_path / "a.tlv") == tftp_itl(b, tmp_path / "b.tlv")
    # The same bytes whenever a node with this identity starts (the timestamp comes from the
    # certificates, not the clock); another identity signs another ITL (the control).
    assert local_itl(a_state) == itl_a
    certs.init_certs(c_state)
    assert local_itl(c_state) != itl_a


def test_import_is_refused_while_the_daemon_runs(
    daemon_factory: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a_state = tmp_path / "node-a"
    certs.init_certs(a_state)
    bundle.export_identity(a_state, tmp_path / "identity.cbid", PASSPHRASE)
    running = daemon_factory(state_dir=tmp_path / "node-b")
    before = (running.state_dir / "certs" / "tvs.pem").read_bytes()
    result = in_process(
        capsys, monkeypatch, PASSPHRASE + "\n", "certs", "import", str(tmp_path / "identity.cbid"),
        "--state-dir", str(running.state_dir),
    )  # fmt: skip
    one_line_error(result, "stop it, import")
    assert (running.state_dir / "certs" / "tvs.pem").read_bytes() == before


def test_bad_bundles_and_passphrases_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a_state, b_state = tmp_path / "node-a", tmp_path / "node-b"
    certs.init_certs(a_state)
    good = tmp_path / "identity.cbid"
    export(a_state, good)
    # The real command for two of them, the same handler in this process for the rest.
    one_line_error(import_(b_state, good, "not the passphrase"), "wrong passphrase")
    one_line_error(import_(b_state, tmp_path / "missing.cbid"), "cannot read")

    def here(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
        return in_process(capsys, monkeypatch, stdin, *args)

    def here_import(src: Path) -> subprocess.CompletedProcess[str]:
        return here(PASSPHRASE + "\n", "certs", "import", str(src), "--state-dir", str(b_state))

    flipped = bytearray(good.read_bytes())
    flipped[-40] ^= 0x01
    (tmp_path / "flipped.cbid").write_bytes(bytes(flipped))
    one_line_error(here_import(tmp_path / "flipped.cbid"), "damaged")
    (tmp_path / "junk.cbid").write_bytes(b"PK\x03\x04 certainly not a bundle")
    one_line_error(here_import(tmp_path / "junk.cbid"), "not a Callboard identity bundle")
    (tmp_path / "huge-n.cbid").write_bytes(bundle.MAGIC + bytes((40, 8, 1)) + bytes(64))
    one_line_error(here_import(tmp_path / "huge-n.cbid"), "unsupported parameters")
    empty = here("", "certs", "import", str(good), "--state-dir", str(b_state))
    one_line_error(empty, "no passphrase on stdin")
    assert not (b_state / "certs" / "sast.key").exists()  # nothing was written

    def here_export(passphrase: str, out: Path, state: Path) -> Any:
        return here(passphrase + "\n", "certs", "export", str(out), "--state-dir", str(state))

    one_line_error(here_export("short", tmp_path / "x", a_state), "at least 8 characters")
    one_line_error(here_export(PASSPHRASE, good, a_state), "already exists")
    nowhere = tmp_path / "nowhere"
    one_line_error(here_export(PASSPHRASE, tmp_path / "y", nowhere), "no usable identity")


def test_a_bundle_missing_a_role_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    certs.init_certs(tmp_path / "a")
    files = {n: (tmp_path / "a" / "certs" / n).read_bytes() for n in bundle.IDENTITY_FILES}
    del files["tvs.key"]
    with pytest.raises(certs.BundleError, match=r"missing: tvs\.key"):
        bundle.decrypt_bundle(bundle.encrypt_bundle(files, PASSPHRASE), PASSPHRASE)
    mismatched = {n: (tmp_path / "a" / "certs" / n).read_bytes() for n in bundle.IDENTITY_FILES}
    mismatched["tvs.key"] = mismatched["https-tftp.key"]  # a key that is not the certificate's
    (tmp_path / "mismatch.cbid").write_bytes(bundle.encrypt_bundle(mismatched, PASSPHRASE))
    result = in_process(
        capsys, monkeypatch, PASSPHRASE + "\n", "certs", "import", str(tmp_path / "mismatch.cbid"),
        "--state-dir", str(tmp_path / "b"),
    )  # fmt: skip
    one_line_error(result, "does not match its key")
    assert not (tmp_path / "b" / "certs" / "tvs.key").exists()
