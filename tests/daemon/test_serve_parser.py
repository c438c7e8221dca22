"""``callboard serve`` builds only the daemon's part of the command line (no client modules
imported), and parses every argument exactly as the whole command line does."""

from __future__ import annotations

import subprocess
import sys

import pytest
from callboard.daemon.main import build_parser, command_of


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["serve", "--state-dir", "/x"], "serve"),
        (["--state-dir", "serve", "status"], "status"),
        (["--state", "serve", "status"], "status"),  # argparse's abbreviation
        (["--admin-socket", "/a.sock", "serve"], "serve"),
        (["--state-dir=/x", "serve"], "serve"),
        (["--version"], None),
        ([], None),
    ],
)
def test_command_of_skips_global_options_and_their_values(
    argv: list[str], command: str | None
) -> None:
    assert command_of(argv) == command


def test_the_serve_parser_parses_serve_like_the_whole_command_line() -> None:
    argv = [
        "--state-dir", "/srv/cb", "serve", "--sip-port", "5070", "--listen-address", "::1",
        "--listen-address", "127.0.0.1", "--set", "tftp.max_blksize=8192", "--demo",
    ]  # fmt: skip
    lean = vars(build_parser("serve").parse_args(argv))
    whole = vars(build_parser().parse_args(argv))
    assert lean.pop("func") is whole.pop("func")
    assert lean == whole


def test_serve_does_not_import_the_emulated_phone() -> None:
    probe = (
        "import sys\n"
        "from callboard.daemon.main import build_parser\n"
        "build_parser('serve').parse_args(['serve', '--sip-port', '5070'])\n"
        "print(any(m.startswith('callboard.phone') for m in sys.modules))\n"
        "build_parser().parse_args(['status'])\n"
        "print(any(m.startswith('callboard.phone') for m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["False", "True"]
