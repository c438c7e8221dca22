"""Activation by voice with a second, independent user agent: Debian's baresip (issue 14).

baresip runs headless from a config directory the test writes: audio from a WAV file of
silence (``aufile``), played into a bridge (``aubridge``) and dumped to WAV by ``sndfile``
(so the test hears what the IVR said), G.711, and the ``ctrl_tcp`` JSON interface the test
drives: wait for REGISTER_OK, ``dial activate``, wait for CALL_ESTABLISHED, ``sndcode
<code>#`` (RFC 4733 events, baresip's own encoder), wait for CALL_CLOSED (the IVR's BYE).
A second baresip with the same account afterwards must be refused (403).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.harness import Daemon
from support.ports import free_listen_port, free_port

BARESIP = "/usr/bin/baresip"
MODULES = Path("/usr/lib/baresip/modules")
MAC = "00AABB112233"
DEADLINE = 60.0  # seconds for the whole call


@pytest.fixture(autouse=True)
def _baresip_is_installed() -> None:
    """A missing peer is a failure, never a skip: .ci/run installs Debian's baresip."""
    assert Path(BARESIP).exists(), "baresip is not installed (Debian package baresip)"
    for module in ("g711", "aufile", "aubridge", "sndfile", "ctrl_tcp", "menu", "account"):
        assert (MODULES / f"{module}.so").exists(), f"baresip module {module} is missing"


class Baresip:
    """One headless baresip with its config directory, driven over ctrl_tcp (netstrings)."""

    def __init__(self, home: Path, daemon: Daemon, user: str, password: str) -> None:
        self.home = home
        self.dump = home / "dump"
        self.dump.mkdir(parents=True, exist_ok=True)
        silence = home / "silence.wav"
        subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", "-b", "16", "-e",
                        "signed-integer", str(silence), "trim", "0", "60"],
                       check=True, timeout=30)  # fmt: skip
        # baresip listens for SIP on the port given (UDP and TCP) and TLS on the next one.
        self.sip_port = free_listen_port(span=2)
        self.ctrl_port = free_port(socket.SOCK_STREAM)
        (home / "config").write_text(
            "poll_method epoll\n"
            "net_interface 127.0.0.1\n"
            f"sip_listen 127.0.0.1:{self.sip_port}\n"
            "call_local_timeout 30\n"
            f"audio_source aufile,{silence}\n"
            "audio_player aubridge,callboard\n"
            "audio_alert aubridge,callboard\n"
            f"module_path {MODULES}\n"
            "module g711.so\nmodule aufile.so\nmodule aubridge.so\nmodule sndfile.so\n"
            f"snd_path {self.dump}\n"
            "module_tmp account.so\nmodule_app menu.so\nmodule ctrl_tcp.so\n"
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}\n"
        )
        (home / "accounts").write_text(
            f"<sip:{user}@127.0.0.1:{daemon.port('sip')};transport=udp>;auth_pass={password}"
            ";regint=600;audio_codecs=PCMU,PCMA\n"
        )
        self.output = home / "baresip.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctrl: socket.socket | None = None
        self._buffer = b""
        self.events: list[dict[str, Any]] = []

    def start(self) -> None:
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen([BARESIP, "-f", str(self.home), "-v"],
                                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 10
        while self.ctrl is None:
            assert self.proc.poll() is None, self.log()
            try:
                self.ctrl = socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=1)
            except OSError:
                assert time.monotonic() < deadline, "baresip's ctrl_tcp never listened"
                time.sleep(0.1)

    def command(self, command: str, params: str = "") -> None:
        assert self.ctrl is not None
        body = json.dumps({"command": command, "params": params, "token": command}).encode()
        self.ctrl.sendall(b"%d:%s," % (len(body), body))

    def wait_for(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next event of type ``kind`` (others are kept in ``events``)."""
        assert self.ctrl is not None
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.events):
                if message.get("event") and message.get("type") == kind:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            assert left > 0, (f"no {kind} from baresip", self.events, self.log()[-3000:])
            self.ctrl.settimeout(left)
            try:
                data = self.ctrl.recv(65536)
            except TimeoutError:
                continue
            assert data, ("baresip closed its control connection", self.log()[-3000:])
            self._buffer += data
            self._frames()

    def registration(self, timeout: float) -> int:
        """The status of the account's first REGISTER answer, as baresip prints it (it may
        come before the control connection is up, so its event can be missed)."""
        deadline = time.monotonic() + timeout
        while True:
            # "user@host: {0/UDP/v4} 200 OK …" on success, "reg: sip:user@…: 403 …" if not.
            found = re.search(r"(?:\{0/UDP/v4\}|reg: sip:\S+:) (\d{3}) ", self.log())
            if found:
                return int(found.group(1))
            assert time.monotonic() < deadline, ("baresip never registered", self.log())
            time.sleep(0.05)

    def _frames(self) -> None:
        while b":" in self._buffer:
            size, _, rest = self._buffer.partition(b":")
            if len(rest) < int(size) + 1:
                return
            self.events.append(json.loads(rest[: int(size)]))
            self._buffer = rest[int(size) + 1 :]

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def stop(self) -> None:
        if self.ctrl is not None:
            self.ctrl.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _sox_stat(path: Path, *effects: str) -> dict[str, str]:
    stat = subprocess.run(["sox", str(path), "-n", *effects, "stat"], capture_output=True,
                          text=True, check=True, timeout=30).stderr  # fmt: skip
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in stat.splitlines())}


def test_baresip_keys_the_code_as_rfc4733_and_the_phone_is_activated(
    daemon_factory: Any, tmp_path: Path
) -> None:
    served: Daemon = daemon_factory("--set", "ivr.answer_delay=0.2", "--set",
                                    "ivr.inter_digit_timeout=4")  # fmt: skip
    assert served.cli("defaults", "set", "8841", "--onboarding", "ivr").returncode == 0
    dev = served.json("device", "add", "--model", "8841", "--mac", MAC, "--line", "3001:Desk",
                      "--password", "pw-3001")  # fmt: skip
    code = served.json("code", "show", dev["name"])["code"].replace("-", "")
    url = f"http://127.0.0.1:{served.port('http')}/SEP{MAC}.cnf.xml"
    with urllib.request.urlopen(url, timeout=10) as resp:
        config = resp.read().decode()
    user = re.findall(r"<authName>(.*?)</authName>", config)[0]
    password = re.findall(r"<authPassword>(.*?)</authPassword>", config)[0]

    phone = Baresip(tmp_path / "baresip", served, user, password)
    try:
        phone.start()
        started = time.monotonic()
        assert phone.registration(10) == 200
        shown = served.json("device", "show", f"SEP{MAC}")
        assert shown["bootstrap"].startswith(f"waiting for the activation call ({user}, "
                                             "registered from 127.0.0.1:")  # fmt: skip
        phone.command("dial", "activate")
        established = phone.wait_for("CALL_ESTABLISHED", 10)
        assert established["peeruri"].startswith("sip:activate@127.0.0.1")
        time.sleep(1.0)  # a second of the prompt before the keys, as a person would
        phone.command("sndcode", code + "#")
        closed = phone.wait_for("CALL_CLOSED", DEADLINE)
        assert time.monotonic() - started < DEADLINE
    finally:
        phone.stop()
    # baresip reports the far end's BYE as "Connection reset by peer".
    assert "reset by peer" in closed.get("param", ""), closed
    assert served.json("device", "show", f"SEP{MAC}")["state"] == "active"
    assert served.json("code", "show", f"SEP{MAC}")["state"] == "used"
    log = served.log()
    assert '"outcome": "activated"' in log and code not in log

    # What baresip heard (sndfile's dump of the decoded stream): speech, and the last
    # seconds before the BYE are the confirmation, not silence.
    heard = sorted(phone.dump.glob("*-dec.wav"))
    assert heard, phone.log()[-2000:]
    whole = _sox_stat(heard[0])
    assert float(whole["Length (seconds)"]) > 3.0 and float(whole["RMS     amplitude"]) > 0.01
    assert float(_sox_stat(heard[0], "trim", "-1.5")["RMS     amplitude"]) > 0.02

    # The bootstrap account is gone: a fresh baresip with it is refused.
    again = Baresip(tmp_path / "again", served, user, password)
    try:
        again.start()
        refused = again.registration(10)
    finally:
        again.stop()
    assert refused == 403, again.log()[-2000:]
