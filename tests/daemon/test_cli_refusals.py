"""The admin CLI says which field was wrong when the daemon refuses a request against its
schema (it used to print only "the request body does not match the schema")."""

from __future__ import annotations

from pathlib import Path
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


def test_a_description_is_200_characters_at_most_and_a_display_name_100(
    daemon: Any, tmp_path: Path
) -> None:
    """As the REST API's schema says; the CLI (and console and import) took any length, and
    a description is the phone's label in its configuration file."""
    long, most = "d" * 201, "d" * 200
    name = daemon.json("device", "add", "--model", "8841", "--description", most)["name"]
    for args in (
        ("device", "add", "--model", "8841", "--description", long),
        ("device", "add", "--model", "8841", "--line", f"1000:{'n' * 101}"),
        ("device", "edit", name, "--description", long),
        ("device", "edit", name, "--line", f"1000:{'n' * 101}"),
    ):
        done = daemon.cli(*args)
        assert done.returncode == 1, args
        assert "00 characters" in done.stderr, done.stderr
    assert daemon.json("device", "show", name)["description"] == most
    csv = tmp_path / "long.csv"
    csv.write_text(f"model,description\n8841,ok\n8841,{long}\n")
    done = daemon.cli("import", "--dummy-mac", str(csv))
    assert done.returncode == 1
    assert "line 3: the description is longer than 200 characters" in done.stderr
