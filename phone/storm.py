"""Placeholder; filled in below."""

from __future__ import annotations

import argparse


def register_cli(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], net: argparse.ArgumentParser
) -> None:
    pass
