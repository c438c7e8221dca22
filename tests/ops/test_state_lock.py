"""One daemon per state directory, between real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from callboard.daemon.lock import LOCK_NAME, AlreadyRunning, acquire_state_lock

# Takes the lock, says so, and holds it until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from callboard.daemon.lock import acquire_state_lock
    lock = acquire_state_lock(Path(sys.argv[1]))
    print("locked", flush=True)
    sys.stdin.read()
    """
)

# Tries once; prints the one-line error and exits 1 as `callboard serve` will.
CONTENDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from callboard.daemon.lock import AlreadyRunning, acquire_state_lock
    started = time.monotonic()
    try:
        acquire_state_lock(Path(sys.argv[1]))
    except AlreadyRunning as exc:
        print(f"{time.monotonic() - started:.3f}")
        print(f"callboard serve: {exc}", file=sys.stderr)
        sys.exit(1)
    print("locked")
    """
)


def child_env() -> dict[str, str]:
    environ = dict(os.environ)
    environ["PYTHONPATH"] = str(Path("build/typecheck").resolve())
    return environ


def start_holder(state_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "locked\n"
    return proc


def contend(state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CONTENDER, str(state_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )


def test_a_second_process_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = start_holder(state)
    try:
        result = contend(state)
    finally:
        holder.communicate("", timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"callboard serve: another callboard (PID {holder.pid}) is running on this state "
        f"directory (it holds {state / LOCK_NAME})"
    ]
    assert float(result.stdout) < 0.5  # refused at once: it never waits for the lock


def test_the_lock_goes_with_the_process_even_killed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = start_holder(state)
    holder.kill()
    holder.wait(timeout=30)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.close()
    holder.stdout.close()
    # The dead holder's PID is still in the file; the lock, not the file, decides.
    assert (state / LOCK_NAME).read_text() == f"{holder.pid}\n"
    result = contend(state)
    assert result.returncode == 0 and result.stdout == "locked\n", result.stderr


def test_other_state_directories_are_independent(tmp_path: Path) -> None:
    holder = start_holder(tmp_path / "one")
    try:
        result = contend(tmp_path / "two")
    finally:
        holder.communicate("", timeout=30)
    assert result.returncode == 0, result.stderr


def test_in_process_release_and_retake(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lock = acquire_state_lock(state)
    assert lock.held and (state / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert oct((state / LOCK_NAME).stat().st_mode & 0o777) == "0o600"
    # flock is per open file: a second open in the same process is refused too.
    with pytest.raises(AlreadyRunning) as caught:
        acquire_state_lock(state)
    assert caught.value.holder_pid == os.getpid()
    lock.release()
    assert not lock.held
    acquire_state_lock(state).release()


def test_an_unknown_holder_pid_still_reads_as_one_line(tmp_path: Path) -> None:
    error = AlreadyRunning(tmp_path / LOCK_NAME, None)
    assert "a process whose PID is unknown" in str(error) and "\n" not in str(error)
