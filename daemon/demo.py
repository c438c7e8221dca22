"""``callboard serve --demo``: a phone to onboard on a fresh machine, and how to do it.

When the registry is empty it adds a BAT placeholder for an 8841 with one line, makes a lab
manufacturing CA (trusted by this daemon only) and a MIC for a demo MAC, and prints the
activation code and the command that onboards the phone. The code goes to the terminal,
never to the log: that is why this is a demo switch and not a production one.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from . import certs
from .admin.app import Actor
from .logs import get_logger
from .registry.model import Device, Line, group_code
from .registry.registry import DeviceSpec

if TYPE_CHECKING:
    from .service import CallboardService

log = get_logger("callboard.demo")

DEMO_MODEL = "8841"
DEMO_MAC = "00000C0FFEE1"
DEMO_USER = "demo"


LAB_DIR = "lab-ca"


def trust_demo_lab(state_dir: Path, trust_dir: Path) -> None:
    """Before the daemon starts: the demo's lab manufacturing CA (made once, in the state
    directory) in the trust store, so that the demo phone's MIC is accepted from the start
    (and the daemon does not first warn that the store is empty)."""
    lab_dir = state_dir / LAB_DIR
    if not (lab_dir / "lab-root.pem").exists():
        certs.write_lab_ca(lab_dir, certs.make_lab_ca())
    trust_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("lab-root.pem", "lab-ca.pem"):
        shutil.copyfile(lab_dir / name, trust_dir / name)


def provision_demo(service: CallboardService, out: TextIO) -> Deferred[None]:
    """Add the demo phone (once the registry has stored it, print how to onboard it)."""
    registry = service.registry
    where = service.listening()
    state_dir = service.config.state_dir
    print("\nCallboard is running (demo mode):", file=out)
    for host, port in where.tftp:
        print(f"  tftp   udp {host}:{port}", file=out)
    for label, places in where.streams.items():
        for place in places:
            print(f"  {label:<6} {place}", file=out)
    if len(registry):
        print("\nThe registry is not empty, so no demo phone was added.", file=out)
        print("  callboard --state-dir", state_dir, "device list", file=out)
        for place in where.streams.get("web", []):
            print(f"  https://{place}/self-care/ (the demo user's password was shown at", file=out)
            print("  first start; `callboard user set-password demo --password-stdin`)", file=out)
        return succeed(None)
    lab_dir = state_dir / LAB_DIR
    lab = certs.load_lab_ca(lab_dir)
    mic_cert, mic_key = certs.write_mic(
        state_dir / "demo-phone", certs.issue_mic(lab, model=DEMO_MODEL, mac=DEMO_MAC)
    )

    def add_phone(password: str | None) -> Deferred[None]:
        # With the web on, the phone belongs to the demo user (made first: a device's user
        # must exist), who sees its code in Self-Care.
        added = registry.add_device(
            DeviceSpec(
                model=DEMO_MODEL,
                description="Callboard demo phone",
                owner_user=DEMO_USER if password else "",
                lines=(Line("1001", "Demo Phone", "1001", secrets.token_urlsafe(12)),),
                requires_activation=True,
            )
        )

        def announce(device: Device) -> None:
            _announce(service, device, mic_cert, mic_key, lab_dir, out)
            if password:
                _announce_web_user(service, password, out)

        return added.addCallback(announce)

    def failed(failure: Failure) -> None:
        log.error("demo phone not provisioned", error=str(failure.value))
        print(f"\nThe demo phone could not be added: {failure.value}", file=out)

    d = _demo_web_user(service).addCallback(add_phone)
    return d.addErrback(failed)


def _announce(
    service: CallboardService,
    device: Device,
    mic_cert: Path,
    mic_key: Path,
    lab_dir: Path,
    out: TextIO,
) -> None:
    where = service.listening()
    code = service.registry.outstanding_code(device)
    assert code is not None
    log.info("demo phone provisioned", device=device.name, model=DEMO_MODEL)
    tftp_host, tftp_port = where.tftp[0]
    http = where.streams["http"][0].rsplit(":", 1)[1]
    https_listeners = where.streams.get("https")
    https = https_listeners[0].rsplit(":", 1)[1] if https_listeners else "0"  # 0: HTTP only
    print(
        f"""
Demo phone: {device.name} (Cisco {DEMO_MODEL}, line 1001), activation code {group_code(code.code)}
A lab manufacturing CA in {lab_dir} is trusted by this daemon; the demo phone's MIC is
{mic_cert}. Onboard it with the emulated phone:

  callboard phone boot --server {tftp_host} --tftp-port {tftp_port} --http-port {http} \\
      --https-port {https} --model {DEMO_MODEL} --mac {DEMO_MAC} \\
      --mic {mic_cert} --mic-key {mic_key} \\
      --code {group_code(code.code)}
""",
        file=out,
        flush=True,
    )


def _demo_web_user(service: CallboardService) -> Deferred[str | None]:
    """With the web listener on: a demo admin (its password), else None."""
    if not service.listening().streams.get("web"):
        return succeed(None)
    password = secrets.token_urlsafe(12)
    actor = Actor("callboard-demo", True, "demo")
    d = service.accounts.add_user(
        actor, DEMO_USER, is_admin=True, display_name="Demo User", password=password
    )
    return d.addCallback(lambda _: password)


def _announce_web_user(service: CallboardService, password: str, out: TextIO) -> None:
    place = service.listening().streams["web"][0]
    print(
        f"""Self-Care and the admin console (self-signed certificate):
  https://{place}/self-care/   user {DEMO_USER}, password {password}
""",
        file=out,
        flush=True,
    )
