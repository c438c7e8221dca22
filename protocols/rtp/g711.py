"""G.711 µ-law and A-law encoders (ITU-T G.711), so prompts can be kept as 16-bit PCM.

Tables of 65536 entries are built once per law on first use; encoding a prompt is then one
``bytes.translate``-like lookup per sample.
"""

from __future__ import annotations

import array
import sys
from functools import cache

PCMU = "PCMU"
PCMA = "PCMA"
SILENCE = {PCMU: 0xFF, PCMA: 0xD5}


def _ulaw(sample: int) -> int:
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sample < 0 else sample, clip) + bias
    exponent = 7
    mask = 0x4000
    while exponent > 0 and not magnitude & mask:
        exponent -= 1
        mask >>= 1
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _alaw(sample: int) -> int:
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(sample if sample >= 0 else -sample - 1, 32767) >> 3
    if magnitude < 32:
        code = magnitude >> 1
    else:
        exponent = magnitude.bit_length() - 5
        code = (exponent << 4) | ((magnitude >> exponent) & 0x0F)
    return (sign | code) ^ 0x55


@cache
def _table(law: str) -> bytes:
    encode = _ulaw if law == PCMU else _alaw
    # Index = the sample's 16 bits read as unsigned.
    return bytes(encode(i - 65536 if i >= 32768 else i) for i in range(65536))


def encode(pcm16: bytes, law: str) -> bytes:
    """Signed 16-bit little-endian mono PCM → G.711 octets of ``law`` (PCMU or PCMA)."""
    if law not in SILENCE:
        raise ValueError(f"unknown G.711 law {law!r}")
    samples = array.array("H")
    samples.frombytes(pcm16[: len(pcm16) - len(pcm16) % 2])
    if sys.byteorder == "big":
        samples.byteswap()
    table = _table(law)
    return bytes(table[s] for s in samples)
