"""Packaged phone-config templates (installed as callboard.daemon.templates)."""
