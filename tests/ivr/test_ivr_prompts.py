"""The voice prompts are real audio: made by scripts/make-prompts (espeak-ng, sox), checked
with sox's own statistics, and replaceable from the state directory (issue 14)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from callboard.daemon.ivr import PACKAGED_PROMPTS, PROMPTS, Prompts, load_prompt

ROOT = Path(__file__).resolve().parents[2]


def _soxi(path: Path, flag: str) -> str:
    return subprocess.run(["soxi", flag, str(path)], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()  # fmt: skip


def _stat(path: Path) -> dict[str, float]:
    err = subprocess.run(["sox", str(path), "-n", "stat"], capture_output=True, text=True,
                         check=True, timeout=30).stderr  # fmt: skip
    pairs = (line.partition(":") for line in err.splitlines())
    return {k.strip(): float(v) for k, _, v in pairs if v.strip()[:1].lstrip("-").isdigit()}


def check_prompt(path: Path) -> None:
    """8 kHz mono 16-bit speech: a second to six long, loud enough, not clipped, not a tone."""
    assert (_soxi(path, "-r"), _soxi(path, "-c"), _soxi(path, "-b")) == ("8000", "1", "16"), path
    stat = _stat(path)
    assert 1.0 < stat["Length (seconds)"] < 6.0, (path, stat)
    assert stat["RMS     amplitude"] > 0.02, (path, stat)
    assert stat["Maximum amplitude"] < 0.99, (path, stat)
    # Speech is not one frequency: a tone or a constant would have a rough frequency of its own
    # and a near-equal RMS and peak; speech's peak is several times its RMS.
    assert stat["Maximum amplitude"] > 2.5 * stat["RMS     amplitude"], (path, stat)


@pytest.mark.parametrize("name", PROMPTS)
def test_packaged_prompts_are_speech(name: str) -> None:
    check_prompt(PACKAGED_PROMPTS / f"{name}.wav")


def test_the_script_makes_every_prompt_and_the_daemon_takes_them(tmp_path: Path) -> None:
    out = tmp_path / "prompts"
    made = subprocess.run([str(ROOT / "scripts" / "make-prompts"), str(out)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert sorted(p.stem for p in out.glob("*.wav")) == sorted(PROMPTS)
    for name in PROMPTS:
        check_prompt(out / f"{name}.wav")
    Prompts(out)  # every prompt, both laws
    # A state directory's prompt replaces ours (only that one); a wrong format is refused.
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", "-b", "16", str(site / "accepted.wav"),
                    "synth", "1.5", "sine", "440"], check=True, timeout=30)  # fmt: skip
    assert len(load_prompt("accepted", site)) == 2 * 12000
    assert load_prompt("rejected", site) == load_prompt("rejected", None)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    subprocess.run(["sox", str(out / "accepted.wav"), "-r", "16000", str(wrong / "accepted.wav")],
                   check=True, timeout=30)  # fmt: skip
    with pytest.raises(ValueError, match="8 kHz mono"):
        load_prompt("accepted", wrong)
