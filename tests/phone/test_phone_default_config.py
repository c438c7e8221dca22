"""The phone reads both forms of the activation-code extension in XMLDefault."""

from __future__ import annotations

from callboard.phone.config import parse_default_config

XML = b"""<Default>
  <callManagerGroup><members><member priority="0"><callManager>
    <ports><sipPort>5060</sipPort></ports><processNodeName>192.0.2.10</processNodeName>
  </callManager></member></members></callManagerGroup>
  <TVS><members><member priority="0"><port>2445</port><address>192.0.2.10</address></member>
  </members></TVS>
  <activationCodeOnboarding>
    <model id="683" name="Cisco 8841"/>
    <device name="SEP0011223344AA"/>
  </activationCodeOnboarding>
</Default>"""


def test_a_listed_model_or_a_listed_device_needs_a_code() -> None:
    config = parse_default_config(XML)
    assert config.requires_code("Cisco 8841", "SEP001122334499")
    assert config.requires_code("Cisco 7821", "SEP0011223344AA")
    assert config.requires_code("Cisco 7821", "sep0011223344aa")
    assert not config.requires_code("Cisco 7821", "SEP0011223344BB")
