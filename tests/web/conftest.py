"""The browser test onboards a phone: it shares the phone end-to-end tests' lab CA fixtures."""

from e2e.phone_e2e_support import lab, lab_dir  # noqa: F401 - fixtures, found by name
