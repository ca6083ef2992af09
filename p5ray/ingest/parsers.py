"""Lines of an interaction log -> typed events, every row either valid or carrying a reason.

Plain functions on pyarrow tables (Ray Data runs them in map tasks; tests call them directly).
Input: a lines table `file` int32, `line` int64, `raw` string (see `readers.read_range`).
Output: `EVENT_SCHEMA`, one row per event; `reason` is null for a valid event, else a short code
from `REASONS` and `raw` keeps the source line. Nothing is inferred from the data: ids stay
strings, numbers are checked value by value, so a column that turns to text after a million
numeric rows costs those rows a reason, not the whole column its type.
"""

from __future__ import annotations

import ast
import csv
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROLES = ("user", "item", "timestamp", "rating", "event")

EVENT_SCHEMA = pa.schema(
    [
        ("file", pa.int32()),
        ("line", pa.int64()),
        ("pos", pa.int32()),  # position inside the line (sequence format: 1 = first item)
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("rating", pa.float32()),
        ("event", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)

# Reasons a row is quarantined (bad input) ...
REASONS = {
    "binary_data": "binary data (NUL byte), not text",
    "wrong_field_count": "wrong number of fields",
    "unclosed_quote": "unclosed quote",
    "bad_json": "not a JSON object",
    "no_items": "a user with no items",
    "missing_user_id": "missing user id",
    "missing_item_id": "missing item id",
    "missing_timestamp": "missing timestamp",
    "bad_timestamp": "non-numeric timestamp",
    "missing_rating": "missing rating",
    "bad_rating": "non-numeric rating",
    "rating_out_of_range": "rating out of range",
}
# ... and reasons a row is dropped without being bad.
DROP_REASONS = {"blank_line": "blank line"}

_INT_RE = r"^-?[0-9]{1,18}$"
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
RAW_MAX_CHARS = 1000


@dataclass(frozen=True)
class LogSpec:
    """How to parse one log. `fields` maps a role (ROLES) to a column index or a key/column name."""

    format: str  # the user-facing name: movielens, sequence, csv, tsv, jsonl, amazon-json, parquet
    layout: str  # delimited | sequence | json | parquet
    files: tuple[str, ...] = ()
    delimiter: str | None = None
    header: tuple[str, ...] = ()  # delimited with a header line: its column names
    n_fields: int = 0
    quoted: bool = False  # csv quoting rules apply
    fields: dict = field(default_factory=dict)
    rating_range: tuple[float, float] | None = None
    note: str = ""


def parse_lines(lines: pa.Table, spec: LogSpec) -> pa.Table:
    """A lines table -> an EVENT_SCHEMA table (valid and bad rows together, in no promised order)."""
    if spec.layout == "parquet":
        return validate(lines, spec)
    raw = pc.if_else(pc.is_null(lines["raw"]), "", lines["raw"])
    lines = lines.set_column(lines.schema.get_field_index("raw"), "raw", raw)
    blank = pc.equal(pc.utf8_trim_whitespace(raw), "")
    binary = pc.match_substring(raw, "\x00")
    parts = [_rejected(lines.filter(blank), "blank_line")]
    parts.append(_rejected(lines.filter(pc.and_not(binary, blank)), "binary_data"))
    rest = lines.filter(pc.invert(pc.or_(blank, binary)))
    if spec.layout == "sequence":
        parts.extend(_parse_sequence(rest, spec))
    elif spec.layout == "json":
        parts.extend(_parse_json(rest, spec))
    else:
        parts.extend(_parse_delimited(rest, spec))
    return pa.concat_tables([p for p in parts if p.num_rows] or [EVENT_SCHEMA.empty_table()])


def _rejected(lines: pa.Table, reason: str) -> pa.Table:
    n = lines.num_rows
    return _events(
        lines["file"], lines["line"], pa.array(np.zeros(n, np.int32)), {}, reason, lines["raw"]
    )


def _events(file, line, pos, typed: dict, reason, raw) -> pa.Table:
    n = len(file)
    nulls = {
        "user_id": pa.nulls(n, pa.string()),
        "item_id": pa.nulls(n, pa.string()),
        "timestamp": pa.nulls(n, pa.int64()),
        "rating": pa.nulls(n, pa.float32()),
        "event": pa.nulls(n, pa.string()),
    }
    nulls.update(typed)
    if isinstance(reason, str):
        reason = pa.array([reason] * n, pa.string())
    cols = {
        "file": file,
        "line": line,
        "pos": pos,
        **nulls,
        "reason": reason,
        "raw": pc.utf8_slice_codeunits(raw, 0, RAW_MAX_CHARS),
    }
    return pa.table(
        {f.name: pc.cast(cols[f.name], f.type) for f in EVENT_SCHEMA}, schema=EVENT_SCHEMA
    )


def _parse_sequence(lines: pa.Table, spec: LogSpec) -> list[pa.Table]:
    """`user item item ...`: one event per item token; pos = the item's place in the line."""
    tokens = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(lines["raw"]))
    count = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
    lonely = count < 2
    out = [_rejected(lines.filter(lonely), "no_items")]
    keep = ~lonely
    lines, tokens = lines.filter(keep), tokens.filter(keep)
    items = pc.list_slice(tokens, 1)
    row = pc.list_parent_indices(items).to_numpy()
    lengths = pc.list_value_length(items).to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    pos = (np.arange(len(row)) - starts[row] + 1).astype(np.int32)
    users = pc.take(pc.list_element(tokens, 0), pa.array(row))
    cols = {"user": users, "item": pc.list_flatten(items)}
    out.append(validate(_with_fields(lines, row, pos, cols), spec))
    return out


def _parse_delimited(lines: pa.Table, spec: LogSpec) -> list[pa.Table]:
    raw = lines["raw"]
    quoted = pc.match_substring(raw, '"') if spec.quoted else pa.array(np.zeros(len(raw), bool))
    plain = lines.filter(pc.invert(quoted))
    lists = pc.split_pattern(plain["raw"], spec.delimiter)
    ok = pc.equal(pc.list_value_length(lists), spec.n_fields)
    out = [_rejected(plain.filter(pc.invert(ok)), "wrong_field_count")]
    plain, lists = plain.filter(ok), lists.filter(ok)
    cols = {role: pc.list_element(lists, idx) for role, idx in spec.fields.items()}
    rows = np.arange(plain.num_rows)
    out.append(validate(_with_fields(plain, rows, None, cols), spec))
    if spec.quoted:
        out.extend(_parse_csv_rows(lines.filter(quoted), spec))
    return out


def _parse_csv_rows(lines: pa.Table, spec: LogSpec) -> list[pa.Table]:
    """The slow path for lines with quotes: Python's csv module, one line at a time."""
    values = {role: [] for role in spec.fields}
    good, bad = [], {"unclosed_quote": [], "wrong_field_count": []}
    for i, text in enumerate(lines["raw"].to_pylist()):
        try:
            row = next(csv.reader([text], delimiter=spec.delimiter, strict=True))
        except (csv.Error, StopIteration):
            bad["unclosed_quote"].append(i)
            continue
        if len(row) != spec.n_fields:
            bad["wrong_field_count"].append(i)
            continue
        good.append(i)
        for role, idx in spec.fields.items():
            values[role].append(row[idx])
    out = [_rejected(_take(lines, rows), reason) for reason, rows in bad.items()]
    cols = {role: pa.array(v, pa.string()) for role, v in values.items()}
    out.append(validate(_with_fields(_take(lines, good), np.arange(len(good)), None, cols), spec))
    return out


def _parse_json(lines: pa.Table, spec: LogSpec) -> list[pa.Table]:
    values = {role: [] for role in spec.fields}
    good, bad = [], []
    for i, text in enumerate(lines["raw"].to_pylist()):
        obj = _load_json(text)
        if not isinstance(obj, dict):
            bad.append(i)
            continue
        good.append(i)
        for role, key in spec.fields.items():
            values[role].append(_scalar_text(obj.get(key)))
    cols = {role: pa.array(v, pa.string()) for role, v in values.items()}
    return [
        _rejected(_take(lines, bad), "bad_json"),
        validate(_with_fields(_take(lines, good), np.arange(len(good)), None, cols), spec),
    ]


def _take(table: pa.Table, rows: list[int]) -> pa.Table:
    return table.take(pa.array(rows, pa.int64()))


def _load_json(text: str):
    """One JSON object; numbers keep their exact text. Old Amazon dumps are Python literals."""
    try:
        return json.loads(text, parse_int=str, parse_float=str)
    except ValueError:
        if text.lstrip().startswith("{'"):
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
        return None


def _scalar_text(value) -> str | None:
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    return str(value)


def _with_fields(lines: pa.Table, rows: np.ndarray, pos, cols: dict) -> pa.Table:
    """A table of string fields (one column per role) beside file/line/pos/raw of their lines."""
    take = pa.array(rows, pa.int64())
    base = {
        "file": pc.take(lines["file"], take),
        "line": pc.take(lines["line"], take),
        "pos": pa.array(np.zeros(len(rows), np.int32) if pos is None else pos, pa.int32()),
        "raw": pc.take(lines["raw"], take),
    }
    base.update({role: pc.cast(c, pa.string()) for role, c in cols.items()})
    return pa.table(base)


def validate(fields: pa.Table, spec: LogSpec) -> pa.Table:
    """String fields per role -> typed EVENT_SCHEMA rows; the first failed check names the reason."""
    n = fields.num_rows
    checks: list[tuple[str, np.ndarray]] = []
    typed = {}
    for role, col in (("user", "user_id"), ("item", "item_id")):
        text = pc.utf8_trim_whitespace(fields[role])
        checks.append((f"missing_{col}", _empty(text)))
        typed[col] = text
    if "timestamp" in spec.fields:
        text = pc.utf8_trim_whitespace(fields["timestamp"])
        values, ok = parse_integers(text)
        checks += [("missing_timestamp", _empty(text)), ("bad_timestamp", ~ok)]
        typed["timestamp"] = pa.array(values, pa.int64())
    if "rating" in spec.fields:
        text = pc.utf8_trim_whitespace(fields["rating"])
        values, ok = parse_floats(text)
        checks += [("missing_rating", _empty(text)), ("bad_rating", ~ok)]
        if spec.rating_range is not None:
            lo, hi = spec.rating_range
            checks.append(("rating_out_of_range", ok & ((values < lo) | (values > hi))))
        typed["rating"] = pa.array(values.astype(np.float32), pa.float32())
    if "event" in spec.fields:
        text = pc.utf8_lower(pc.utf8_trim_whitespace(fields["event"]))
        typed["event"] = pc.if_else(_arrow_bool(_empty(text)), pa.scalar(None, pa.string()), text)
    reason = np.full(n, None, dtype=object)
    bad = np.zeros(n, bool)
    for code, failed in reversed(checks):
        reason[failed] = code
        bad |= failed
    raw = pc.if_else(_arrow_bool(bad), fields["raw"], pa.scalar(None, pa.string()))
    return _events(
        fields["file"], fields["line"], fields["pos"], typed, pa.array(reason, pa.string()), raw
    )


def _empty(text: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.equal(text, ""), True).to_numpy(zero_copy_only=False)


def _arrow_bool(mask: np.ndarray) -> pa.Array:
    return pa.array(mask, pa.bool_())


def parse_integers(text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Decimal text -> int64 values and an ok mask; `1.5e9` is accepted and rounded."""
    values = np.zeros(len(text), np.int64)
    is_int = pc.fill_null(pc.match_substring_regex(text, _INT_RE), False).to_numpy(
        zero_copy_only=False
    )
    if is_int.any():
        values[is_int] = pc.cast(text.filter(pa.array(is_int)), pa.int64()).to_numpy()
    floats, is_float = parse_floats(text)
    is_float &= ~is_int & (np.abs(floats) < 9.2e18)
    values[is_float] = np.round(floats[is_float]).astype(np.int64)
    return values, is_int | is_float


def parse_floats(text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Decimal text -> float64 values and an ok mask (finite numbers only)."""
    values = np.zeros(len(text), np.float64)
    ok = pc.fill_null(pc.match_substring_regex(text, _FLOAT_RE), False).to_numpy(
        zero_copy_only=False
    )
    if ok.any():
        values[ok] = pc.cast(text.filter(pa.array(ok)), pa.float64()).to_numpy()
    ok &= np.isfinite(values)
    return values, ok
