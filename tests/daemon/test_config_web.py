"""The web's configuration: [web], [smtp] and [self_care] sections, network.web_port."""

from __future__ import annotations

from pathlib import Path

import pytest
from callboard.daemon.config import ConfigError, load_config
from callboard.daemon.web.settings import SelfCareSettings, SMTPSettings, WebSettings


def test_the_web_is_off_unless_asked_and_its_sections_are_settings() -> None:
    config = load_config(None)
    assert config.network.web_port == -1 and config.endpoints.web == ""
    assert config.web == WebSettings() and config.smtp == SMTPSettings()
    assert config.self_care == SelfCareSettings() and config.self_care.show_phones_ready_to_activate


def test_web_keys_from_the_file_and_flags(tmp_path: Path) -> None:
    from callboard.daemon.main import build_parser, serve_config

    path = tmp_path / "callboard.toml"
    path.write_text(
        "[web]\nsession_idle_minutes = 10\nfailure_budget = 7\n"
        '[smtp]\nhost = "mail.example"\nfrom = "cb@example.test"\nstarttls = false\n'
        "[self_care]\nshow_phones_ready_to_activate = false\n"
    )
    config = load_config(path, {"network.web_port": 8443})
    assert config.network.web_port == 8443
    assert (config.web.session_idle_minutes, config.web.failure_budget) == (10, 7)
    assert (config.smtp.host, config.smtp.sender, config.smtp.starttls) == (
        "mail.example",
        "cb@example.test",
        False,
    )
    assert not config.self_care.show_phones_ready_to_activate
    args = build_parser().parse_args(
        ["serve", "--web-port", "0", "--set", "smtp.from=x@example.test"]
    )
    flagged = serve_config(args)
    assert flagged.network.web_port == 0 and flagged.smtp.sender == "x@example.test"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[network]\nweb_port = -2\n", ["network.web_port", "not a port"]),
        ("[web]\nsession_idle_minutes = 0\n", ["web.session_idle_minutes", "out of range"]),
        ('[web]\ncert = "/x.pem"\n', ["web.cert", "go together"]),
        ('[smtp]\nhost = "mail.example"\n', ["smtp.from", "From address"]),
        ('[smtp]\nsender = "a@b.c"\n', ["smtp.sender", "unknown"]),
        ("[smtp]\nport = 0\n", ["smtp.port", "out of range"]),
        ('[endpoints]\nweb = "nonsense"\n', ["endpoints.web"]),
        ("[self_care]\nshow_phones_ready_to_activate = 1\n", ["true or false"]),
    ],
)
def test_bad_web_settings_are_refused_naming_the_key(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = tmp_path / "callboard.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    for word in words:
        assert word in str(caught.value), str(caught.value)
