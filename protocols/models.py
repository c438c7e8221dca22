"""Cisco phone identity: models, their model IDs, and MAC addresses.

One place for the daemon, the protocols and the emulated phone.

The model ID is the number in ``loadInformation<ID>`` and in REGISTER's
``+u.sip!model.ccm.cisco.com`` (shared/reference/cisco-protocols.md, section 3). The NR
("no radio") variants have no published ID; they share the base model's ID here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """A supported phone model: its product name and Cisco model ID."""

    name: str  # "8841"
    model_id: str  # "683"

    @property
    def product(self) -> str:
        return f"Cisco {self.name}"


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo("7811", "36213"),
        ModelInfo("7821", "621"),
        ModelInfo("7832", "36247"),
        ModelInfo("7841", "622"),
        ModelInfo("7861", "623"),
        ModelInfo("8811", "36217"),
        ModelInfo("8832", "36258"),
        ModelInfo("8832NR", "36258"),
        ModelInfo("8841", "683"),
        ModelInfo("8845", "36224"),
        ModelInfo("8851", "684"),
        ModelInfo("8851NR", "684"),
        ModelInfo("8861", "685"),
        ModelInfo("8865", "36225"),
        ModelInfo("8865NR", "36225"),
    )
}

MODEL_IDS: dict[str, str] = {name: info.model_id for name, info in MODELS.items()}


def model_key(raw: str) -> str:
    """``CP-8841``, ``Cisco 8841``, `` 8841 `` → ``8841`` (not checked against the table)."""
    return re.sub(r"\s+", " ", raw.strip().upper()).removeprefix("CISCO ").removeprefix("CP-")


_MAC_SEPARATORS = re.compile(r"[\s:.\-]")
_MAC = re.compile(r"^[0-9A-F]{12}$")


def normalise_mac(raw: str) -> str:
    """``00:aa:bb:cc:dd:ee``, ``00-AA-…``, ``00aa.bbcc.ddee`` → ``00AABBCCDDEE``.

    Raises :class:`ValueError` for anything that is not 12 hex digits.
    """
    mac = _MAC_SEPARATORS.sub("", raw).upper()
    if not _MAC.match(mac):
        raise ValueError(f"invalid MAC address {raw!r}: expected 12 hex digits")
    return mac
