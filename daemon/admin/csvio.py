"""Bulk CSV: reading phones to import, writing activation codes to hand out.

RFC 4180 in both directions. Cells that a spreadsheet would run as a formula are written
with a leading apostrophe and read back without it. Codes are written grouped
(``1234-5678-9012-3456``) so that spreadsheets keep all 16 digits; both forms import.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..registry.model import Line, Onboarding, RegistryError, model_info, normalise_mac
from ..registry.registry import DeviceSpec

IMPORT_COLUMNS = (
    "mac",
    "model",
    "description",
    "user",
    "directory_number",
    "display_name",
    "requires_activation",
)
OPTIONAL_COLUMNS = ("auth_name", "auth_password", "onboarding")
EXPORT_COLUMNS = (
    "device",
    "model",
    "description",
    "user",
    "directory_number",
    "activation_code",
    "expires",
    "bound_to",
)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class CSVFormatError(Exception):
    """The file is not a usable import CSV (no header, unknown columns, broken quoting)."""


@dataclass(frozen=True)
class ImportRow:
    line: int  # line number in the file; the header is line 1
    cells: dict[str, str]


def guard_cell(value: str) -> str:
    """Keep a spreadsheet from evaluating a cell as a formula."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def unguard_cell(value: str) -> str:
    return value[1:] if value.startswith("'") and value[1:].startswith(_FORMULA_STARTS) else value


def read_import_rows(text: str) -> list[ImportRow]:
    """Parse an import file into rows keyed by column, with their line numbers."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[ImportRow] = []
    try:
        header = next(reader, None)
        if header is None:
            raise CSVFormatError("the file is empty; a header row is required")
        columns = [h.strip().lower() for h in header]
        known = set(IMPORT_COLUMNS) | set(OPTIONAL_COLUMNS)
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise CSVFormatError(
                f"line 1: unknown column(s) {', '.join(unknown)}; "
                f"expected {', '.join(IMPORT_COLUMNS)}"
            )
        if "model" not in columns:
            raise CSVFormatError("line 1: the header has no 'model' column")
        if len(set(columns)) != len(columns):
            raise CSVFormatError("line 1: a column appears twice")
        start = reader.line_num + 1
        for record in reader:
            if not any(cell.strip() for cell in record):
                start = reader.line_num + 1
                continue
            if len(record) != len(columns):
                raise CSVFormatError(
                    f"line {start}: {len(record)} cells where the header has {len(columns)}"
                )
            cells = {c: unguard_cell(v.strip()) for c, v in zip(columns, record, strict=True)}
            rows.append(ImportRow(start, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise CSVFormatError(f"line {reader.line_num}: {exc}") from None
    return rows


def row_to_spec(row: dict[str, Any], *, dummy_mac: bool) -> DeviceSpec:
    """Turn one import row into a device spec; raise :class:`RegistryError` with the reason."""
    cells = {k: str(v).strip() for k, v in row.items() if v is not None}
    mac = cells.get("mac", "")
    if mac:
        mac = normalise_mac(mac)
    elif not dummy_mac:
        raise RegistryError("mac is blank (use --dummy-mac to create BAT placeholders)")
    model = cells.get("model", "")
    if not model:
        raise RegistryError("model is blank")
    model = model_info(model).name
    flag = cells.get("requires_activation", "").lower()
    if flag in ("", "default"):
        requires: bool | None = None
    elif flag in ("true", "yes", "1"):
        requires = True
    elif flag in ("false", "no", "0"):
        requires = False
    else:
        raise RegistryError(f"requires_activation must be true, false or blank, not {flag!r}")
    dn = cells.get("directory_number", "")
    lines: tuple[Line, ...] = ()
    if dn:
        lines = (
            Line(
                directory_number=dn,
                display_name=cells.get("display_name", ""),
                auth_name=cells.get("auth_name", ""),
                auth_password=cells.get("auth_password", ""),
            ),
        )
    elif cells.get("display_name"):
        raise RegistryError("display_name given without a directory_number")
    return DeviceSpec(
        model=model,
        mac=mac or None,
        description=cells.get("description", ""),
        owner_user=cells.get("user", ""),
        lines=lines,
        requires_activation=requires,
        onboarding=_onboarding_cell(cells.get("onboarding", "")),
    )


def _onboarding_cell(cell: str) -> Onboarding | None:
    """A row's own onboarding method; blank or ``default`` follows the model's."""
    if cell.lower() in ("", "default"):
        return None
    try:
        return Onboarding(cell.lower())
    except ValueError:
        choices = ", ".join(o.value for o in Onboarding)
        raise RegistryError(f"onboarding must be one of {choices} or blank, not {cell!r}") from None


def write_codes_csv(rows: Iterable[dict[str, str]]) -> str:
    """Render outstanding codes (dicts with :data:`EXPORT_COLUMNS`) as guarded CSV."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(EXPORT_COLUMNS)
    for row in rows:
        writer.writerow([guard_cell(str(row.get(column, ""))) for column in EXPORT_COLUMNS])
    return out.getvalue()
