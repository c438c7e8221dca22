"""Socket activation: LISTEN_* parsing rules, then real descriptors in a real child process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from callboard.daemon.systemd_fds import (
    ROLE_NAMES,
    SocketActivationError,
    parse_listen_fds,
    read_listen_fds,
    refuse_unknown_names,
)

PID = 4242


def env(**variables: str) -> dict[str, str]:
    return {"LISTEN_PID": str(PID), **variables}


# -- the variables, as dicts -----------------------------------------------------------------


def test_names_map_to_descriptors_in_order() -> None:
    fds = parse_listen_fds(env(LISTEN_FDS="5", LISTEN_FDNAMES="tftp:http:tvs:tftp:sip-udp"), PID)
    assert fds == {"tftp": [3, 6], "http": [4], "tvs": [5], "sip-udp": [7]}


def test_nothing_inherited() -> None:
    assert parse_listen_fds({}, PID) == {}
    assert parse_listen_fds(env(LISTEN_FDS="0", LISTEN_FDNAMES=""), PID) == {}
    assert parse_listen_fds({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}, PID) == {}


def test_zero_descriptors_is_empty() -> None:
    assert parse_listen_fds(env(LISTEN_FDS="0"), PID) == {}


def test_variables_for_another_process_are_ignored() -> None:
    other = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "tftp"}
    assert parse_listen_fds(other, PID) == {}


def test_descriptors_without_names_are_unknown() -> None:
    assert parse_listen_fds(env(LISTEN_FDS="2"), PID) == {"unknown": [3, 4]}


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a count of descriptors"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a count"),
        ({"LISTEN_FDS": ""}, "LISTEN_FDS='' is not a count"),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "tftp"}, "LISTEN_FDS=2 but LISTEN_FDNAMES has 1"),
    ],
)
def test_malformed_variables_are_one_line_errors(variables: dict[str, str], message: str) -> None:
    with pytest.raises(SocketActivationError) as caught:
        parse_listen_fds(env(**variables), PID)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_malformed_listen_pid() -> None:
    with pytest.raises(SocketActivationError, match="LISTEN_PID='x' is not a process id"):
        parse_listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, PID)


def test_unknown_names_are_refused_with_the_known_ones_listed() -> None:
    fds = {"http": [3], "callboard-tftp.socket": [4], "ftp": [5, 6]}
    with pytest.raises(SocketActivationError) as caught:
        refuse_unknown_names(fds, ROLE_NAMES)
    text = str(caught.value)
    assert "'callboard-tftp.socket' (fd 4)" in text and "'ftp' (fd 5, 6)" in text
    assert "FileDescriptorName=" in text
    for role in ("tftp", "http", "https", "tvs", "sip-udp", "sip-tcp", "sip-tls", "web"):
        assert role in text
    assert "\n" not in text
    refuse_unknown_names({"http": [3], "tvs": [4]}, ROLE_NAMES)  # all known: no error


def test_unknown_is_relative_to_what_the_caller_serves() -> None:
    with pytest.raises(SocketActivationError, match="'metrics'"):
        refuse_unknown_names({"metrics": [3]}, {"tftp", "http"})


def test_read_unsets_the_variables_even_when_malformed() -> None:
    environ = env(LISTEN_FDS="bad", LISTEN_FDNAMES="x")
    with pytest.raises(SocketActivationError):
        read_listen_fds(environ, pid=PID)
    assert environ == {}


def test_reading_after_twisted_endpoints_is_refused() -> None:
    # The test process has imported twisted.internet.endpoints (pytest-twisted did), so
    # the real environment can no longer be trusted to hold LISTEN_FDS.
    import twisted.internet.endpoints  # noqa: F401

    with pytest.raises(SocketActivationError, match=r"before twisted\.internet\.endpoints"):
        read_listen_fds()


# -- real descriptors in a child process ------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, socket, sys
    from callboard.daemon import systemd_fds
    try:
        fds = systemd_fds.inherited_sockets()
    except systemd_fds.SocketActivationError as exc:
        print(f"callboard serve: {exc}", file=sys.stderr)
        sys.exit(2)
    described = {}
    for name, numbers in fds.items():
        for fd in numbers:
            s = socket.socket(fileno=fd)
            where = s.getsockname() if s.family == socket.AF_UNIX else list(s.getsockname())
            dgram = s.type == socket.SOCK_DGRAM
            described.setdefault(name, []).append([fd, dgram, where, s.get_inheritable()])
            s.detach()
    import os
    described["left"] = [k for k in os.environ if k.startswith("LISTEN_")]
    print(json.dumps(described))
    """
)

# Puts the sockets it was given at 3, 4, … sets LISTEN_* for its own PID and execs the child,
# which is what systemd does between fork and exec.
LAUNCHER = textwrap.dedent(
    """
    import fcntl, os, sys
    given = [int(x) for x in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in given]  # out of the way
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(given)),
                      LISTEN_FDNAMES=sys.argv[2])
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[3]])
    """
)


def child_env() -> dict[str, str]:
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(Path("build/typecheck").resolve()), environ.get("PYTHONPATH", "")]
    )
    return environ


def launch(sockets: list[socket.socket], names: str) -> subprocess.CompletedProcess[str]:
    numbers = [s.fileno() for s in sockets]
    return subprocess.run(
        [sys.executable, "-c", LAUNCHER, ",".join(map(str, numbers)), names, CHILD],
        pass_fds=numbers,
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )


def bound(kind: socket.SocketKind) -> socket.socket:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        s.listen()
    return s


def test_real_sockets_arrive_by_role() -> None:
    sockets = [
        bound(socket.SOCK_DGRAM),
        bound(socket.SOCK_STREAM),
        bound(socket.SOCK_STREAM),
        bound(socket.SOCK_DGRAM),
    ]
    try:
        result = launch(sockets, "tftp:http:tvs:sip-udp")
    finally:
        ports = [s.getsockname()[1] for s in sockets]
        for s in sockets:
            s.close()
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {
        "tftp": [[3, True, ["127.0.0.1", ports[0]], False]],
        "http": [[4, False, ["127.0.0.1", ports[1]], False]],
        "tvs": [[5, False, ["127.0.0.1", ports[2]], False]],
        "sip-udp": [[6, True, ["127.0.0.1", ports[3]], False]],
        "left": [],  # unset, so nothing we start inherits them
    }


def test_a_stream_socket_named_tftp_is_refused() -> None:
    s = bound(socket.SOCK_STREAM)
    try:
        result = launch([s], "tftp")
    finally:
        s.close()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "callboard serve: fd 3 named 'tftp' is a stream socket; TFTP (UDP 69) needs "
        "ListenDatagram= in its .socket unit"
    ]


def test_an_unknown_name_is_refused_in_one_line() -> None:
    s = bound(socket.SOCK_STREAM)
    try:
        result = launch([s], "gopher")
    finally:
        s.close()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown socket name 'gopher' (fd 3)" in lines[0]


def test_descriptors_from_systemd_socket_activate(tmp_path: Path) -> None:
    """systemd's own launcher sets LISTEN_* (names included) exactly as the manager does."""
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate (Debian package systemd) is required"
    http, tvs = tmp_path / "http.sock", tmp_path / "tvs.sock"
    child = CHILD + textwrap.dedent(
        """
        conn, _ = socket.socket(fileno=fds["tvs"][0]).accept()
        conn.sendall(b"tvs here")
        conn.close()
        """
    )
    # The launcher passes on only the variables it is told to (-E), like a unit's Environment=.
    proc = subprocess.Popen(
        [tool, "-l", str(http), "-l", str(tvs), "--fdname=http:tvs",
         "-E", f"PYTHONPATH={child_env()['PYTHONPATH']}", sys.executable, "-c", child],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not tvs.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(20)
        client.connect(str(tvs))  # the first connection makes the launcher exec the child
        try:
            greeting = client.recv(100)
        except OSError as exc:
            greeting = repr(exc).encode()
        client.close()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert greeting == b"tvs here", err
    assert proc.returncode == 0, err
    seen = json.loads(out)
    assert seen["http"] == [[3, False, str(http), False]]
    assert seen["tvs"] == [[4, False, str(tvs), False]]
