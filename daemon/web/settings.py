"""The ``[web]`` and ``[self_care]`` configuration sections (``[smtp]`` is in ``mail``)."""

from __future__ import annotations

from dataclasses import dataclass


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
    sender: str = ""  # the From address; config key ``smtp.from`` (``sender`` also accepted)
    timeout: float = 30.0
    helo: str = ""
