"""Which files to read and how: `--format auto` sniffing, column mapping, header checks.

`resolve` turns `--input` (a file or a directory) and `--format` into a `LogSpec` for
`parsers.parse_lines`, failing with a DataError that names the file (and line) when the input
is missing, unreadable, empty, binary, or has a header without the needed columns; a comma
header on a tab-separated file says so instead of yielding one garbled column.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from p5ray.errors import DataError
from p5ray.ingest.parsers import LogSpec
from p5ray.ingest.readers import PARQUET_MAGIC, head_lines, read_head

log = logging.getLogger("p5ray.prepare")

FORMATS = ("auto", "movielens", "sequence", "csv", "tsv", "parquet", "jsonl", "amazon-json")
MOVIELENS_FILES = ("u.data", "ratings.dat", "ratings.csv")
DEFAULT_COLUMNS = {
    "user": "user_id",
    "item": "item_id",
    "timestamp": "timestamp",
    "rating": "rating",
    "event": "event",
}
AMAZON_COLUMNS = {
    "user": "reviewerID",
    "item": "asin",
    "timestamp": "unixReviewTime",
    "rating": "overall",
}
MOVIELENS_CSV_COLUMNS = {
    "user": "userId",
    "item": "movieId",
    "timestamp": "timestamp",
    "rating": "rating",
}
RATING_RANGES = {"movielens": (0.5, 5.0), "amazon-json": (1.0, 5.0)}


def resolve(
    path: str, fmt: str = "auto", columns: dict | None = None, rating_range=None
) -> LogSpec:
    """The files to read and how to parse them; DataError names the file when that is unclear."""
    files = _input_files(Path(path), fmt)
    heads = [read_head(f) for f in files]
    if fmt == "auto":
        fmt, note = sniff(files[0], heads[0])
        log.info("format auto: picked %s for %s (%s)", fmt, files[0], note)
    else:
        note = "given with --format"
    given = {k: v for k, v in (columns or {}).items() if v}
    specs = [
        _spec_for(fmt, f, h, {**DEFAULT_COLUMNS, **given}, given)
        for f, h in zip(files, heads, strict=True)
    ]
    for f, other in zip(files[1:], specs[1:], strict=True):
        if other.fields != specs[0].fields or other.delimiter != specs[0].delimiter:
            raise DataError(str(f), f"its columns differ from those of {files[0]}", line=1)
    spec = replace(specs[0], files=tuple(str(f) for f in files), note=note)
    if rating_range is not None:
        spec = replace(spec, rating_range=tuple(rating_range))
    return spec


def _input_files(path: Path, fmt: str) -> list[Path]:
    if not path.exists():
        raise DataError(str(path), "no such file or directory", hint="check --input")
    if path.is_dir():
        try:
            names = sorted(
                p for p in path.iterdir() if not p.name.startswith((".", "_")) and p.is_file()
            )
        except PermissionError as exc:
            raise DataError(str(path), f"cannot read directory: {exc.strerror}") from exc
        if fmt in ("auto", "movielens"):
            for name in MOVIELENS_FILES:
                if (path / name).is_file():
                    return [path / name]
        if not names:
            raise DataError(str(path), "directory holds no input files")
        files = names
    else:
        files = [path]
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(str(f), "cannot read file: permission denied")
    return files


def sniff(path: Path, head: bytes) -> tuple[str, str]:
    """Guess the format of a file from its name and first lines; returns (format, why)."""
    name = path.name.removesuffix(".gz")
    if head[:4] == PARQUET_MAGIC or name.endswith(".parquet"):
        return "parquet", "Parquet file"
    lines = head_lines(head)
    if not lines:
        raise DataError(str(path), "empty file: no rows to read")
    first = lines[0].lstrip("\ufeff")
    if first.lstrip().startswith("{"):
        keys = _json_keys(first)
        if {"reviewerID", "asin"} <= keys:
            return "amazon-json", "JSON lines with reviewerID and asin"
        return "jsonl", "JSON lines"
    if name in MOVIELENS_FILES:
        return "movielens", f"file named {name}"
    if "::" in first:
        return "movielens", "'::'-separated like ratings.dat"
    if first.replace(" ", "").lower().startswith("userid,movieid"):
        return "movielens", "header userId,movieId like ratings.csv"
    delim = "\t" if first.count("\t") > first.count(",") else ","
    cols = [c.strip().strip('"') for c in first.split(delim)]
    if "user_id" in cols or "item_id" in cols:
        return ("tsv" if delim == "\t" else "csv"), f"header {cols}"
    fields = {len(ln.split("\t")) for ln in lines}
    if fields in ({4}, {3}) and "\t" in first:
        return "movielens", "tab-separated user item rating timestamp rows like u.data"
    multi = sum(len(ln.split()) >= 2 for ln in lines)
    if len(first.split()) >= 2 and multi >= 0.5 * len(lines) and "," not in first:
        return "sequence", "whitespace-separated 'user item item ...' lines"
    raise DataError(str(path), "cannot tell the format of this file", line=1, hint="pass --format")


def _json_keys(line: str) -> set[str]:
    try:
        obj = json.loads(line)
    except ValueError:
        return {k for k in ("reviewerID", "asin") if f"'{k}'" in line or f'"{k}"' in line}
    return set(obj) if isinstance(obj, dict) else set()


def _spec_for(fmt: str, path: Path, head: bytes, names: dict, given: dict) -> LogSpec:
    if fmt == "parquet":
        return _parquet_spec(path, names, given)
    lines = head_lines(head)
    first = lines[0].lstrip("\ufeff") if lines else ""
    if fmt == "sequence":
        return LogSpec("sequence", "sequence", fields={"user": 0, "item": 1})
    if fmt in ("jsonl", "amazon-json"):
        defaults = AMAZON_COLUMNS if fmt == "amazon-json" else names
        fields = {
            r: given.get(r, defaults[r])
            for r in ("user", "item", "timestamp", "rating", "event")
            if r in defaults or r in given
        }
        if fmt == "jsonl":
            keys = _json_keys(first)
            fields = {
                r: k for r, k in fields.items() if r in ("user", "item") or r in given or k in keys
            }
        return LogSpec(fmt, "json", fields=fields, rating_range=RATING_RANGES.get(fmt))
    if fmt == "movielens":
        return _movielens_spec(path, first, given)
    delim = "\t" if fmt == "tsv" else ","
    return _header_spec(fmt, path, first, delim, names, given, rating_range=None)


def _movielens_spec(path: Path, first: str, given: dict) -> LogSpec:
    fixed = {"user": 0, "item": 1, "rating": 2, "timestamp": 3}
    rr = RATING_RANGES["movielens"]
    if "::" in first:
        return LogSpec(
            "movielens", "delimited", delimiter="::", n_fields=4, fields=fixed, rating_range=rr
        )
    if "\t" in first:
        return LogSpec(
            "movielens", "delimited", delimiter="\t", n_fields=4, fields=fixed, rating_range=rr
        )
    names = {**MOVIELENS_CSV_COLUMNS, **given}
    return _header_spec("movielens", path, first, ",", names, given, rating_range=rr)


def _header_spec(fmt, path, first, delim, names, given, rating_range) -> LogSpec:
    """csv/tsv with a header line: map roles to column positions, fail loudly on a bad header."""
    header = tuple(c.strip() for c in next(csv.reader([first], delimiter=delim)))
    fields = {}
    for role in ("user", "item", "timestamp", "rating", "event"):
        name = names.get(role)
        if name in header:
            fields[role] = header.index(name)
        elif role in ("user", "item") or role in given:
            other = "tab" if delim == "," else "comma"
            looks = ("\t" if delim == "," else ",") in first and len(header) == 1
            hint = (
                f"the file looks {other}-separated; try --format {'tsv' if delim == ',' else 'csv'}"
                if looks
                else (f"name the column with --{role}-col" if role in ("user", "item") else None)
            )
            raise DataError(
                str(path), f"no column '{name}' in the header {list(header)}", line=1, hint=hint
            )
    return LogSpec(
        fmt,
        "delimited",
        delimiter=delim,
        header=header,
        n_fields=len(header),
        quoted=True,
        fields=fields,
        rating_range=rating_range,
    )


def _parquet_spec(path: Path, names: dict, given: dict) -> LogSpec:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(str(path), f"not a readable Parquet file: {exc}") from exc
    fields = {}
    for role in ("user", "item", "timestamp", "rating", "event"):
        if names[role] in schema.names:
            fields[role] = names[role]
        elif role in ("user", "item") or role in given:
            raise DataError(
                str(path), f"no column '{names[role]}' in {schema.names}", hint=f"use --{role}-col"
            )
    return LogSpec("parquet", "parquet", header=tuple(schema.names), fields=fields)
