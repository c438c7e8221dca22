"""Fixtures the phone end-to-end tests share: a lab manufacturing CA the daemon trusts."""

from e2e.phone_e2e_support import lab, lab_dir  # noqa: F401 - fixtures, found by name
