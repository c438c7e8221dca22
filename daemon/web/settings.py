"""The ``[web]``, ``[smtp]`` and ``[self_care]`` configuration sections.

Each settings class is its configuration section (``protocols/settings.py``): a field is the
key of the same name unless its metadata says otherwise, and ``validate()`` names the field it
refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from callboard.protocols.settings import SettingError, check_range, config_key


@dataclass(frozen=True)
class WebSettings:
    """The HTTPS listener: its certificate, sessions and the sign-in throttle."""

    cert: str = ""  # PEM certificate (chain); default <state_dir>/certs/web.pem, made at start
    key: str = ""  # PEM private key; default <state_dir>/certs/web.key
    session_idle_minutes: float = 30.0
    session_absolute_hours: float = 12.0
    # Sign-in throttle, as the TVS one: failures per user and per source in a window.
    failure_budget: int = 5
    failure_budget_per_source: int = 0  # 0: the same as failure_budget
    failure_window_seconds: float = 900.0
    hsts_seconds: int = 31536000

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise SettingError("cert", "web.cert and web.key go together")
        check_range("session_idle_minutes", self.session_idle_minutes, 1, 24 * 60)
        idle_hours = self.session_idle_minutes / 60
        check_range("session_absolute_hours", self.session_absolute_hours, idle_hours, 24 * 30)
        check_range("failure_budget", self.failure_budget, 1, 1_000_000)
        check_range("failure_budget_per_source", self.failure_budget_per_source, 0, 1_000_000)
        check_range("failure_window_seconds", self.failure_window_seconds, 1, 1e7)
        check_range("hsts_seconds", self.hsts_seconds, 0, 10 * 31536000)


@dataclass(frozen=True)
class SelfCareSettings:
    """CUCM's enterprise parameter "Show Phones Ready to Activate" (default true)."""

    show_phones_ready_to_activate: bool = True


@dataclass(frozen=True)
class SMTPSettings:
    """The ``[smtp]`` section; no ``host``: codes cannot be emailed."""

    host: str = ""
    port: int = 25
    starttls: bool = True
    user: str = ""
    password: str = ""
    # The From address; the key is ``smtp.from`` (a Python keyword, hence the field name).
    sender: str = field(default="", metadata=config_key("from"))
    timeout: float = 30.0
    helo: str = ""

    def validate(self) -> None:
        check_range("port", self.port, 1, 65535)
        check_range("timeout", self.timeout, 0.1, 3600)
        if self.host and "@" not in self.sender:
            raise SettingError("sender", "a From address (name@domain) is needed with smtp.host")
        if self.password and not self.user:
            raise SettingError("password", "smtp.password needs smtp.user")
