"""SEP configs a real phone can use: the elements CUCM sends, deviceSecurityMode consistent with
the transport, per-model and per-device templates, and missing firmware loads reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from callboard.daemon.config import ConfigError, load_config
from callboard.daemon.provisioning import PhoneSettings, ProvisioningSettings, ProvisioningTree
from callboard.daemon.registry.model import Device, Line
from callboard.daemon.registry.registry import Registry
from callboard.protocols.filesource import DirectorySource


def make_tree(
    tmp_path: Path, registry: Registry, *, templates: Path | None = None, **settings: Any
) -> ProvisioningTree:
    root = tmp_path / "tftp"
    root.mkdir(exist_ok=True)
    (root / "sip88xx.14-2-1.loads").write_bytes(b"x")
    phones = PhoneSettings(**settings.pop("phones", {}))
    base = ProvisioningSettings(
        address="192.0.2.10",
        sip_port=5060,
        sip_tls_port=5061,
        tvs_port=2445,
        loads={"8841": "sip88xx.14-2-1", "7821": "sip78xx.14-2-1"},
        **settings,
    )
    return ProvisioningTree(
        registry, base, DirectorySource(str(root)), template_dir=templates, phones=phones
    )


def device(model: str = "8841", mac: str = "001122334455") -> Device:
    return Device(
        id="1" * 32,
        name=f"SEP{mac}",
        model=model,
        lines=(Line("1001", "Alice", "a1001", "pw"), Line("1002", "Bob")),
    )


def render(tree: ProvisioningTree, dev: Device | None = None) -> ET.Element:
    return ET.fromstring(tree.render_device(dev or device()))


def test_the_elements_cucm_sends(tmp_path: Path, registry: Registry) -> None:
    root = render(make_tree(tmp_path, registry))
    dts = root.find("devicePool/dateTimeSetting")
    assert dts is not None and dts.findtext("timeZone") == "Greenwich Standard Time"
    assert root.findtext("sipProfile/sipCallFeatures/remoteCcEnable") == "true"
    stack = root.find("sipProfile/sipStack")
    assert stack is not None
    assert stack.findtext("timerRegisterExpires") == "3600"
    assert stack.findtext("timerKeepAliveExpires") == "120"
    assert stack.findtext("timerT1") == "500" and stack.findtext("timerT2") == "4000"
    assert root.findtext("userLocale/name") == "English_United_States"
    assert root.findtext("userLocale/langCode") == "en_US"
    assert root.findtext("networkLocale") == "United_States"
    assert root.find("commonProfile") is not None and root.find("vendorConfig") is not None
    assert root.findtext("loadInformation") == "sip88xx.14-2-1"
    lines = root.findall("sipProfile/sipLines/line")
    assert [ln.findtext("proxy") for ln in lines] == ["USECALLMANAGER"] * 2
    assert [ln.findtext("maxNumCalls") for ln in lines] == ["4", "4"]
    assert [ln.findtext("busyTrigger") for ln in lines] == ["2", "2"]
    assert all(ln.find("messagesNumber") is not None for ln in lines)
    # Unset: the phone's built-in softkeys and no dial template, rather than a missing file.
    assert root.find("sipProfile/softKeyFile") is None
    assert root.find("sipProfile/dialTemplate") is None


def test_phone_settings_reach_the_config(tmp_path: Path, registry: Registry) -> None:
    tree = make_tree(
        tmp_path,
        registry,
        phones={
            "time_zone": "Central Europe Standard/Daylight Time",
            "olson_time_zone": "Europe/Berlin",
            "ntp_servers": ("192.0.2.1", "192.0.2.2"),
            "user_locale": "German_Germany",
            "user_locale_language": "de_DE",
            "network_locale": "Germany",
            "softkey_file": "softkeys.xml",
            "dial_template": "dialplan.xml",
            "messages_number": "8000",
            "max_calls": 6,
            "busy_trigger": 3,
        },
    )
    root = render(tree)
    assert root.findtext("devicePool/dateTimeSetting/olsonTimeZone") == "Europe/Berlin"
    ntps = root.findall("devicePool/dateTimeSetting/ntps/ntp")
    assert [(n.findtext("name"), n.findtext("ntpMode")) for n in ntps] == [
        ("192.0.2.1", "Unicast"),
        ("192.0.2.2", "Unicast"),
    ]
    assert root.findtext("userLocale/langCode") == "de_DE"
    assert root.findtext("networkLocaleInfo/name") == "Germany"
    assert root.findtext("sipProfile/softKeyFile") == "softkeys.xml"
    assert root.findtext("sipProfile/dialTemplate") == "dialplan.xml"
    line = root.find("sipProfile/sipLines/line")
    assert line is not None
    assert (line.findtext("messagesNumber"), line.findtext("maxNumCalls")) == ("8000", "6")
    assert line.findtext("busyTrigger") == "3"


@pytest.mark.parametrize(
    ("transport", "mode", "expected"),
    [
        ("tcp", 0, ("1", "1")),
        ("udp", 0, ("1", "2")),
        ("tls", 0, ("2", "3")),
        ("tls", 3, ("3", "3")),
    ],
)
def test_device_security_mode_follows_the_transport(
    tmp_path: Path, registry: Registry, transport: str, mode: int, expected: tuple[str, str]
) -> None:
    tree = make_tree(tmp_path, registry, transport=transport, device_security_mode=mode)
    root = render(tree)
    got = (root.findtext("deviceSecurityMode"), root.findtext("transportLayerProtocol"))
    assert got == expected


@pytest.mark.parametrize(("transport", "mode"), [("tls", 1), ("tcp", 2), ("udp", 3), ("tcp", 7)])
def test_inconsistent_security_mode_is_refused_at_start(transport: str, mode: int) -> None:
    with pytest.raises(ConfigError, match=r"sip\.device_security_mode"):
        load_config(None, {"sip.transport": transport, "sip.device_security_mode": mode})


def test_phones_section_is_checked() -> None:
    config = load_config(None, {"phones.ntp_servers": ["192.0.2.1"], "phones.max_calls": 2})
    assert config.phones.ntp_servers == ("192.0.2.1",)
    with pytest.raises(ConfigError, match=r"phones\.busy_trigger"):
        load_config(None, {"phones.max_calls": 2, "phones.busy_trigger": 3})
    with pytest.raises(ConfigError, match=r"phones\.softkey_file"):
        load_config(None, {"phones.softkey_file": "../etc/passwd"})


def test_vendor_config_per_model_family_and_device(tmp_path: Path, registry: Registry) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "vendorConfig-SEP0011223344AA.xml").write_text(
        "  <vendorConfig><webAccess>0</webAccess><label>$device_name</label></vendorConfig>\n"
    )
    (templates / "vendorConfig-78xx.xml").write_text(
        "  <vendorConfig><family>78xx</family></vendorConfig>\n"
    )
    tree = make_tree(tmp_path, registry, templates=templates)
    packaged = render(tree, device("8841"))
    assert packaged.findtext("vendorConfig/pcPort") == "0"
    assert packaged.findtext("vendorConfig/webAccess") == "1"  # off unless asked for
    assert render(tree, device("8865")).findtext("vendorConfig/videoCapability") == "1"
    assert render(tree, device("8841")).find("vendorConfig/videoCapability") is None
    assert render(tree, device("7811")).find("vendorConfig/pcPort") is None  # packaged 7811
    assert render(tree, device("7821")).findtext("vendorConfig/family") == "78xx"
    one = render(tree, device("8841", "0011223344AA"))
    assert one.findtext("vendorConfig/webAccess") == "0"
    assert one.findtext("vendorConfig/label") == "SEP0011223344AA"


def test_whole_config_per_model_and_device(tmp_path: Path, registry: Registry) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "SEPDevice-7821.cnf.xml").write_text(
        "<device><model>$model</model><lines>\n$lines\n</lines></device>\n"
    )
    (templates / "SEP0011223344BB.cnf.xml").write_text(
        "<device><only>$device_name</only></device>\n"
    )
    tree = make_tree(tmp_path, registry, templates=templates)
    assert render(tree, device("7821")).findtext("model") == "7821"
    assert render(tree, device("8841", "0011223344BB")).findtext("only") == "SEP0011223344BB"
    assert render(tree, device("8841")).find("sipProfile") is not None


def test_a_broken_per_model_template_stops_start_up(tmp_path: Path, registry: Registry) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "vendorConfig-8845.xml").write_text("<vendorConfig>$no_such_value</vendorConfig>")
    with pytest.raises(ValueError, match="template is broken"):
        make_tree(tmp_path, registry, templates=templates)


def test_missing_firmware_loads_are_reported(tmp_path: Path, registry: Registry) -> None:
    tree = make_tree(tmp_path, registry)
    assert tree.missing_loads() == ["sip78xx.14-2-1"]
    [warning] = tree.warnings()
    assert "sip78xx.14-2-1.loads is not in the TFTP root" in warning
    (tmp_path / "tftp" / "sip78xx.14-2-1.loads").write_bytes(b"x")
    assert tree.warnings() == []
