"""The bootstrap config's hotline: lifting the handset dials the activation number (issue 14).

Cisco phones take a hotline (PLAR) from their dial template: an empty pattern with a timeout
of 0 and ``rewrite`` the number (usecallmanager.nz "Dial Templates"). The bootstrap config
names the template; the provisioning tree renders it from ``ivr.number``.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from callboard.daemon.ivr import HOTLINE_FILE, hotline_dial_template, with_hotline
from callboard.phone.config import parse_device_config, parse_hotline
from support.harness import Daemon

MAC = "00AABB112233"


def _get(daemon: Daemon, name: str) -> bytes:
    url = f"http://127.0.0.1:{daemon.port('http')}/{name}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: bytes = resp.read()
    return data


def test_the_dial_template_is_a_hotline_to_the_number() -> None:
    root = ET.fromstring(hotline_dial_template('2288"<x'))
    rules = root.findall("TEMPLATE")
    assert root.tag == "dialTemplate" and len(rules) == 1
    assert rules[0].attrib == {"match": "", "timeout": "0", "rewrite": '2288"<x'}
    assert parse_hotline(hotline_dial_template("2288")) == "2288"
    # A site dial template without an off-hook rule is no hotline; junk is none either.
    assert parse_hotline(b'<dialTemplate><TEMPLATE match="9*" timeout="3"/></dialTemplate>') is None
    assert parse_hotline(b"<not xml") is None


def test_any_template_gets_the_hotline() -> None:
    site = b"<device><sipProfile><dialTemplate>site.xml</dialTemplate></sipProfile></device>"
    assert parse_device_config(with_hotline(site)).dial_template == HOTLINE_FILE
    bare = b"<device><sipProfile><sipLines/></sipProfile></device>"
    assert parse_device_config(with_hotline(bare)).dial_template == HOTLINE_FILE


def test_bootstrap_config_names_the_hotline_and_the_real_config_does_not(
    daemon_factory: Any,
) -> None:
    served: Daemon = daemon_factory("--set", 'ivr.number="2288"')
    assert served.cli("defaults", "set", "8841", "--onboarding", "ivr").returncode == 0
    served.json("device", "add", "--model", "8841", "--mac", MAC, "--line", "3001:Desk")
    bootstrap = _get(served, f"SEP{MAC}.cnf.xml")
    config = parse_device_config(bootstrap)
    assert config.dial_template == HOTLINE_FILE
    assert [line.name for line in config.lines] == [f"bootstrap-{MAC.lower()}"]
    assert re.search(rb"<featureLabel>Activate</featureLabel>", bootstrap)
    assert parse_hotline(_get(served, HOTLINE_FILE)) == "2288"
    # Phones ask for names in any case.
    assert _get(served, HOTLINE_FILE.upper()) == _get(served, HOTLINE_FILE)
    # A phone that may not activate by voice gets neither the config nor anything else new.
    with pytest.raises(urllib.error.HTTPError):
        _get(served, "SEP00AABB112299.cnf.xml")
