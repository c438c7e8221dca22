"""Bulk import benchmark: N phones from one CSV through the real CLI and daemon.

Usage: python bench/registry_import.py [--rows 10000] [--runs 3]

Starts `callboard serve` on loopback with a temporary state dir, writes a CSV of N rows
(half with MACs, half BAT placeholders), times `callboard import --dummy-mac` end to end
(CSV parse, admin API, validation, one SQLite transaction with synchronous=FULL), then
`callboard codes export`. Bounded: one import per run, loopback only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from support.harness import Daemon, run_cli


def write_csv(path: Path, rows: int) -> None:
    with path.open("w") as fh:
        fh.write("mac,model,description,user,directory_number,display_name,requires_activation\n")
        for i in range(rows):
            mac = f"00AA{i:08X}" if i % 2 else ""
            fh.write(f"{mac},8841,desk {i},user{i},{100000 + i},Phone {i},\n")


def one_run(rows: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        daemon = Daemon(base / "state").start()
        try:
            csv_path = base / "phones.csv"
            write_csv(csv_path, rows)
            start = time.perf_counter()
            result = daemon.cli("import", str(csv_path), "--dummy-mac", timeout=600)
            elapsed = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(f"import failed: {result.stderr}")
            start = time.perf_counter()
            result = daemon.cli("codes", "export", str(base / "codes.csv"), timeout=600)
            export = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(f"export failed: {result.stderr}")
            lines = (base / "codes.csv").read_text().count("\n") - 1
            assert lines == rows, lines
            return elapsed, export
        finally:
            daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    assert run_cli("--version").returncode == 0
    results = [one_run(args.rows) for _ in range(args.runs)]
    imports = [r[0] for r in results]
    exports = [r[1] for r in results]
    print(f"rows: {args.rows}, runs: {args.runs}")
    print(
        f"import: median {statistics.median(imports):.2f} s "
        f"({args.rows / statistics.median(imports):,.0f} phones/s), all {imports}"
    )
    print(f"codes export: median {statistics.median(exports):.2f} s")


if __name__ == "__main__":
    main()
