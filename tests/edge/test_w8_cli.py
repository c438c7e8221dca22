"""The admin CLI says which field was wrong when the daemon refuses a request against its
schema (it used to print only "the request body does not match the schema")."""

from __future__ import annotations

from typing import Any


def test_a_schema_refusal_names_the_field_and_the_rule(daemon: Any) -> None:
    name = daemon.json("device", "add", "--model", "8841", "--line", "1000")["name"]
    for args, field in (
        (("device", "edit", name, "--line", ""), "lines/0/directory_number"),
        (("user", "add", ""), "name"),
    ):
        done = daemon.cli(*args)
        assert done.returncode == 1, done.stdout
        [line] = done.stderr.strip().splitlines()
        assert "does not match the schema" in line
        assert f"({field}: String should have at least 1 character)" in line, line
    assert daemon.json("device", "show", name)["lines"][0]["directory_number"] == "1000"
