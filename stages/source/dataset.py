"""Reading ``(prompt, answer)`` rows from a jsonl or parquet file, with row-level checks.

Format is chosen by suffix: ``.jsonl`` / ``.json`` (one JSON object per line; blank lines
are ignored) or ``.parquet`` / ``.pq``. The prompt and answer field names are configurable.

Per-row rules: the prompt must be a non-empty string; the answer must be a string or a
number (numbers are converted with ``str``; booleans are rejected). An empty answer is
allowed (tasks whose reward ignores it).

Failure behaviour: a missing or unreadable file, an unknown suffix, a missing parquet
column or an empty dataset raises ``DatasetError`` naming the file. A bad row (invalid
JSON, not an object, missing field, wrong type) raises ``DatasetError`` naming the file,
the line (jsonl, 1-based) or row (parquet, 0-based) and the field — unless
``skip_bad_rows`` is set, in which case the row is skipped, its message is kept in
``LoadedDataset.bad_rows`` and it is counted; an all-bad file still raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message names file, line/row, field."""


@dataclass
class LoadedDataset:
    """Rows of one dataset file, in file order."""

    path: Path
    rows: list[tuple[str, str]]
    bad_rows: list[str] = field(default_factory=list)
    """Messages of rows skipped under ``skip_bad_rows`` (empty otherwise)."""


def _check_row(record: object, where: str, prompt_field: str, answer_field: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object with fields {prompt_field!r} and "
                           f"{answer_field!r}, got {type(record).__name__}")
    values: list[str] = []
    for name, is_prompt in ((prompt_field, True), (answer_field, False)):
        if name not in record:
            present = ", ".join(map(repr, list(record)[:10])) or "none"
            raise DatasetError(f"{where}: missing field {name!r} (fields present: {present})")
        value = record[name]
        if isinstance(value, str):
            if is_prompt and not value:
                raise DatasetError(f"{where}: field {name!r} is an empty string")
            values.append(value)
        elif not is_prompt and isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append(str(value))
        else:
            expected = "a non-empty string" if is_prompt else "a string or a number"
            raise DatasetError(f"{where}: field {name!r} must be {expected}, got "
                               f"{type(value).__name__} {value!r:.60}")
    return values[0], values[1]


def load_dataset(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer", *,
                 skip_bad_rows: bool = False) -> LoadedDataset:
    """All rows of ``path``; see the module docstring for formats and errors."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {path}: no such file")
    suffix = path.suffix.lower()
    loaded = LoadedDataset(path, [])

    def add(record: object, where: str) -> None:
        try:
            loaded.rows.append(_check_row(record, where, prompt_field, answer_field))
        except DatasetError as exc:
            if not skip_bad_rows:
                raise
            loaded.bad_rows.append(str(exc))

    if suffix in JSONL_SUFFIXES:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"dataset {path} line {line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    if not skip_bad_rows:
                        raise DatasetError(f"{where}: invalid JSON: {exc}") from exc
                    loaded.bad_rows.append(f"{where}: invalid JSON: {exc}")
                    continue
                add(record, where)
    elif suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            schema_names = pq.read_schema(path).names
        except Exception as exc:
            raise DatasetError(f"dataset {path}: not a readable parquet file: {exc}") from exc
        for name in (prompt_field, answer_field):
            if name not in schema_names:
                raise DatasetError(f"dataset {path}: no column {name!r} (columns: "
                                   f"{', '.join(map(repr, schema_names))})")
        table = pq.read_table(path, columns=[prompt_field, answer_field])
        prompts = table.column(prompt_field).to_pylist()
        answers = table.column(answer_field).to_pylist()
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            add({prompt_field: prompt, answer_field: answer}, f"dataset {path} row {row} (0-based)")
    else:
        raise DatasetError(f"dataset {path}: unknown suffix {suffix!r} (expected one of "
                           f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})")
    if not loaded.rows:
        detail = f"; first bad row: {loaded.bad_rows[0]}" if loaded.bad_rows else ""
        raise DatasetError(f"dataset {path}: no usable rows{detail}")
    return loaded
