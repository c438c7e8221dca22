"""The virtual file tree: what each phone gets, rendered from the registry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
import pytest_twisted
from callboard.daemon import provisioning
from callboard.daemon.provisioning import ProvisioningSettings, ProvisioningTree
from callboard.daemon.registry.model import Line, Onboarding
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.protocols.filesource import (
    AccessViolation,
    DirectorySource,
    FileNotFound,
    Requester,
)

PHONE = Requester("127.0.0.1", 50000, "tftp")


@pytest.fixture
def tree(tmp_path: Path, registry: Registry) -> ProvisioningTree:
    root = tmp_path / "tftp"
    root.mkdir()
    (root / "sip88xx.14-2-1.loads").write_bytes(b"firmware")
    settings = ProvisioningSettings(
        address="192.0.2.10",
        sip_port=5060,
        sip_tls_port=5061,
        tvs_port=2445,
        loads={"8841": "sip88xx.14-2-1", "8851": "sip88xx.14-2-1"},
    )
    return ProvisioningTree(
        registry, settings, DirectorySource(str(root)), trust_list=lambda: b"ITL-BYTES"
    )


def fetch(tree: ProvisioningTree, name: str) -> bytes:
    body = tree.open(name, PHONE)
    return body.read_at(0, body.size)


@pytest_twisted.ensureDeferred
async def test_xml_default_names_servers_loads_and_activation_models(
    tree: ProvisioningTree, registry: Registry
) -> None:
    root = ET.fromstring(fetch(tree, "XMLDefault.cnf.xml"))
    assert root.tag == "Default"
    member = root.find("callManagerGroup/members/member/callManager")
    assert member is not None
    assert member.findtext("processNodeName") == "192.0.2.10"
    assert member.findtext("ports/sipPort") == "5060"
    assert root.findtext("TVS/members/member/port") == "2445"
    assert root.findtext("TVS/members/member/address") == "192.0.2.10"
    load = root.find("loadInformation683")
    assert load is not None and load.get("model") == "Cisco 8841"
    assert load.text == "sip88xx.14-2-1"
    ids = {m.get("id") for m in root.iterfind("activationCodeOnboarding/model")}
    assert {"683", "684", "621"} <= ids
    await registry.set_default("7821", Onboarding.AUTOREGISTRATION)
    root = ET.fromstring(fetch(tree, "xmldefault.cnf.xml"))
    names = {m.get("name") for m in root.iterfind("activationCodeOnboarding/model")}
    assert "Cisco 7821" not in names and "Cisco 8841" in names


@pytest_twisted.ensureDeferred
async def test_sep_config_only_once_active_and_never_for_bat(
    tree: ProvisioningTree, registry: Registry
) -> None:
    device = await registry.add_device(
        DeviceSpec(
            model="8841",
            mac="001122334455",
            lines=(Line("1001", "Al & <Bo>", "al", "p<w"),),
            description='"quoted" & <tagged>',
        )
    )
    with pytest.raises(FileNotFound):
        fetch(tree, "SEP001122334455.cnf.xml")
    code = registry.outstanding_code(device)
    assert code is not None
    assert (
        await registry.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    ).ok
    xml = fetch(tree, "sep001122334455.cnf.xml")  # MAC matched case-insensitively
    root = ET.fromstring(xml)
    line = root.find("sipProfile/sipLines/line")
    assert line is not None
    assert line.findtext("displayName") == "Al & <Bo>"
    assert line.findtext("authName") == "al" and line.findtext("authPassword") == "p<w"
    # The server comes from callManagerGroup; an address here stops real phones registering.
    assert line.findtext("proxy") == "USECALLMANAGER"
    member = "devicePool/callManagerGroup/members/member/callManager"
    assert root.findtext(f"{member}/processNodeName") == "192.0.2.10"
    assert root.findtext("description") == '"quoted" & <tagged>'
    assert root.findtext("sipProfile/sipStack/timerRegisterExpires") == "3600"
    assert root.findtext("loadInformation") == "sip88xx.14-2-1"
    stamp = root.findtext("versionStamp")
    await registry.generate_code(device.name)
    with pytest.raises(FileNotFound):  # back to awaiting activation: no longer served
        fetch(tree, "SEP001122334455.cnf.xml")
    await registry.set_requires_activation(device.name, False)
    again = ET.fromstring(fetch(tree, "SEP001122334455.cnf.xml"))
    assert again.findtext("versionStamp") != stamp

    bat = await registry.add_device(DeviceSpec(model="8841", requires_activation=False))
    with pytest.raises(FileNotFound):
        fetch(tree, f"{bat.name}.cnf.xml")


def test_trust_lists_and_files_from_the_root(tree: ProvisioningTree) -> None:
    assert fetch(tree, "ITLFile.tlv") == b"ITL-BYTES"
    assert fetch(tree, "ITLSEP001122334455.tlv") == b"ITL-BYTES"
    for name in ("CTLSEP001122334455.tlv", "CTLFile.tlv", "SEP001122334455.cnf.xml.sgn"):
        with pytest.raises(FileNotFound):
            fetch(tree, name)
    assert fetch(tree, "/sip88xx.14-2-1.loads") == b"firmware"
    assert fetch(tree, "\\sip88xx.14-2-1.loads") == b"firmware"
    with pytest.raises(AccessViolation):
        fetch(tree, "../etc/passwd")
    with pytest.raises(FileNotFound):
        fetch(tree, "missing.bin")


def test_names_rendered_or_refused_by_name_never_come_from_disk(
    tree: ProvisioningTree, tmp_path: Path
) -> None:
    """The stem screen before the patterns: on disk or not, these names answer as before."""
    refused = [
        "CTLFile.tlv", "ctlsep001122334455.tlv", "SEPDefault.cnf", "sepdefault.cnf",
        "BAT001122334455.cnf.xml", "bat001122334455.cnf.xml.sgn", "SEP001122334455.cnf.xml",
        "SEP001122334455.cnf.xml.enc.sgn",
    ]  # fmt: skip
    served = ["sepx.bin", "ctl.bin", "batch.loads", "itl.txt", "SEPDefault.cnf.bak", "xm.bin"]
    for name in refused + served:
        (tmp_path / "tftp" / name).write_bytes(b"on disk")
    for name in refused:
        with pytest.raises(FileNotFound):
            fetch(tree, name)
    assert fetch(tree, "ITLFile.tlv") == b"ITL-BYTES"
    assert fetch(tree, "ITLSEP001122334455.tlv") == b"ITL-BYTES"
    for name in served:
        assert fetch(tree, name) == b"on disk"
    patterns = (provisioning._SEP_CONFIG, provisioning._ITL, provisioning._CTL)
    patterns += (provisioning._RENDERED_ONLY,)
    for name in [n.lower() for n in refused] + ["itlfile.tlv", "itlsep001122334455.tlv"]:
        assert any(p.match(name) for p in patterns), name
        assert name[:3] in provisioning._RENDERED_STEMS, name


def test_a_broken_template_override_stops_start_up(tmp_path: Path, registry: Registry) -> None:
    overrides = tmp_path / "templates"
    overrides.mkdir()
    (overrides / "XMLDefault.cnf.xml").write_text("<Default>$unknown_placeholder</Default>")
    settings = ProvisioningSettings(address="192.0.2.10", sip_port=1, sip_tls_port=2, tvs_port=3)
    with pytest.raises(ValueError, match="template"):
        ProvisioningTree(registry, settings, DirectorySource(str(tmp_path)), template_dir=overrides)


def test_daemon_serves_the_tree_over_tftp_and_http(daemon: Any) -> None:
    """curl (HTTP and tftp://) and tftp-hpa against the running daemon."""
    http, tftp = daemon.port("http"), daemon.port("tftp")
    xml = subprocess.run(
        ["curl", "-sf", f"http://127.0.0.1:{http}/XMLDefault.cnf.xml"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    root = ET.fromstring(xml)
    assert root.findtext("TVS/members/member/port") == str(daemon.port("tvs"))
    via_tftp = subprocess.run(
        ["curl", "-sf", f"tftp://127.0.0.1:{tftp}/XMLDefault.cnf.xml"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    assert via_tftp == xml
    out = daemon.state_dir.parent / "XMLDefault-atftp.xml"
    subprocess.run(
        [
            "atftp",
            "--get",
            "-r",
            "XMLDefault.cnf.xml",
            "-l",
            str(out),
            "--option",
            "blksize 1468",
            "--option",
            "windowsize 4",
            "127.0.0.1",
            str(tftp),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    assert out.read_bytes() == xml
    missing = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://127.0.0.1:{http}/SEP001122334455.cnf.xml",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.stdout == "404"
    added = daemon.json(
        "device",
        "add",
        "--model",
        "8841",
        "--mac",
        "001122334455",
        "--line",
        "1001:Desk",
        "--no-require-activation",
    )
    assert added["state"] == "provisioned"
    out = daemon.state_dir.parent / "SEP001122334455.cnf.xml"
    hpa = subprocess.run(
        [
            "tftp",
            "-m",
            "binary",
            "127.0.0.1",
            str(tftp),
            "-c",
            "get",
            "SEP001122334455.cnf.xml",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert hpa.returncode == 0, hpa.stderr
    assert ET.parse(out).getroot().findtext("sipProfile/sipLines/line/name") == "1001"
    itl = subprocess.run(
        ["curl", "-sf", f"http://127.0.0.1:{http}/ITLSEP001122334455.tlv"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    assert itl[:1] == b"\x01"  # VERSION tag first
    served = [json.loads(line) for line in daemon.log().splitlines() if '"config served"' in line]
    assert [(e["device"], e["transport"]) for e in served] == [("SEP001122334455", "tftp")]


def test_daemon_serves_firmware_to_atftp_curl_and_tftp_hpa(daemon: Any, tmp_path: Path) -> None:
    """A multi-megabyte binary from the TFTP root, with blksize and windowsize options."""
    firmware = bytes(range(256)) * (3 * 4096 + 17)  # ~3 MB, not block-aligned
    (daemon.state_dir / "tftp" / "sip88xx.14-2-1.loads").write_bytes(firmware)
    port = str(daemon.port("tftp"))
    for i, window in enumerate(("1", "16")):
        out = tmp_path / f"atftp-{i}.bin"
        subprocess.run(
            [
                "atftp",
                "--get",
                "-r",
                "sip88xx.14-2-1.loads",
                "-l",
                str(out),
                "--option",
                "blksize 1468",
                "--option",
                f"windowsize {window}",
                "127.0.0.1",
                port,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        assert out.read_bytes() == firmware
    via_curl = subprocess.run(
        ["curl", "-sf", "--tftp-blksize", "1468", f"tftp://127.0.0.1:{port}/sip88xx.14-2-1.loads"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    assert via_curl == firmware
    out = tmp_path / "hpa.bin"
    subprocess.run(
        ["tftp", "-m", "binary", "127.0.0.1", port, "-c", "get", "sip88xx.14-2-1.loads", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert out.read_bytes() == firmware
    http = subprocess.run(
        [
            "curl",
            "-sf",
            "-r",
            "1000-1999",
            f"http://127.0.0.1:{daemon.port('http')}/sip88xx.14-2-1.loads",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    assert http == firmware[1000:2000]


def test_daemon_listens_on_ipv4_and_ipv6_loopback(daemon_factory: Any, tmp_path: Path) -> None:
    """Two listen addresses (the harness's 127.0.0.1 and ::1): a socket on each."""
    daemon = daemon_factory("--listen-address", "::1", state_dir=tmp_path / "v6")
    v6 = {
        label: [p for p in daemon.status[label] if p.startswith("::1:")]
        for label in ("tftp", "http")
    }
    assert all(len(places) == 1 for places in v6.values()), daemon.status
    tftp_port, http_port = (int(v6[k][0].rsplit(":", 1)[1]) for k in ("tftp", "http"))
    tftp = subprocess.run(
        ["curl", "-sf", f"tftp://[::1]:{tftp_port}/XMLDefault.cnf.xml"],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    root = ET.fromstring(tftp)
    # Configs advertise the first listen address.
    assert root.findtext("callManagerGroup/members/member/callManager/processNodeName") == (
        "127.0.0.1"
    )
    http = subprocess.run(
        ["curl", "-sfg", f"http://[::1]:{http_port}/XMLDefault.cnf.xml"],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    assert http == tftp


@pytest_twisted.ensureDeferred
async def test_a_code_required_of_one_phone_of_an_auto_registering_model(
    tree: ProvisioningTree, registry: Registry
) -> None:
    await registry.set_default("7821", Onboarding.AUTOREGISTRATION)
    one = await registry.add_device(
        DeviceSpec(model="7821", mac="0011223344AA", requires_activation=True)
    )
    await registry.add_device(DeviceSpec(model="7821", mac="0011223344BB"))  # follows the default
    root = ET.fromstring(fetch(tree, "XMLDefault.cnf.xml"))
    assert [d.get("name") for d in root.iterfind("activationCodeOnboarding/device")] == [one.name]
    assert "Cisco 7821" not in {
        m.get("name") for m in root.iterfind("activationCodeOnboarding/model")
    }
    code = registry.outstanding_code(one)
    assert code is not None
    assert (
        await registry.redeem(mac="0011223344AA", model="7821", code=code.code, mic_sha256="")
    ).ok
    root = ET.fromstring(fetch(tree, "XMLDefault.cnf.xml"))
    assert root.find("activationCodeOnboarding/device") is None
