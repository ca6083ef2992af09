"""Writing the prepared directory: byte-stable Parquet, the quarantine CSV, the atomic rename,
and the writers of its files from batches that arrive in index order.

Parquet bytes depend only on the rows: tables are rebuffered into row groups of a fixed number
of rows (never the block sizes Ray Data happened to produce) and written with fixed options.
The directory is built under a temporary name beside `--out` and renamed at the end, so a
failure leaves nothing at `--out`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p5ray.errors import OutputExistsError, UserError
from p5ray.ingest import events

ROWS_PER_GROUP = 1 << 16
QUARANTINE_COLUMNS = ["source", "line", "reason", "raw"]


class ParquetSink:
    """A Parquet file written in row groups of exactly `rows_per_group` rows (the last: fewer)."""

    def __init__(self, path: Path, schema: pa.Schema, rows_per_group: int = ROWS_PER_GROUP):
        self.path, self.schema, self.rows_per_group = path, schema, rows_per_group
        self._writer = pq.ParquetWriter(
            path,
            schema,
            compression="zstd",
            compression_level=3,
            use_dictionary=True,
            write_statistics=True,
        )
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self._buffer.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, n: int) -> None:
        whole = pa.concat_tables(self._buffer)
        self._write_group(whole.slice(0, n))
        rest = whole.slice(n)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def _write_group(self, table: pa.Table) -> None:
        self._writer.write_table(table.combine_chunks(), row_group_size=self.rows_per_group)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._buffered:
            self._flush(self._buffered)
        if self.rows == 0:
            self._writer.write_table(self.schema.empty_table())
        self._writer.close()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_table(path: Path, table: pa.Table, schema: pa.Schema | None = None) -> None:
    with ParquetSink(path, schema or table.schema) as sink:
        sink.write(table)


def write_quarantine(path: Path, rows: pa.Table, files: tuple[str, ...]) -> None:
    """Bad rows sorted by (file, line, position): `source`, `line`, `reason`, `raw`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = rows.sort_by([("file", "ascending"), ("line", "ascending"), ("pos", "ascending")])
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(QUARANTINE_COLUMNS)
        for r in rows.select(["file", "line", "reason", "raw"]).to_pylist():
            out.writerow([files[r["file"]], r["line"], r["reason"], _printable(r["raw"] or "")])


def _printable(text: str) -> str:
    """Control characters (NUL and friends) escaped so the CSV stays text."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c == "\t" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_out(out: Path, overwrite: bool, inputs: list[str]) -> None:
    """Refuse an existing --out without --overwrite, and an --out that would swallow the input."""
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out"
        )
    for name in inputs:
        src = Path(name).resolve()
        if src == out or out in src.parents:
            raise UserError(
                f"--out {out} would replace the input {src}", hint="choose another --out"
            )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(
            f"cannot write under {parent}: permission denied", hint="choose another --out"
        )


@contextmanager
def staging_dir(out: Path, overwrite: bool):
    """A temporary directory beside `out`, renamed to `out` when the block succeeds, removed if not."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists", hint="pass --overwrite to replace it")
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


@dataclass
class SplitCounts:
    """What writing the sequences and splits learned on the way (per-user and per-item state)."""

    n_interactions: np.ndarray  # (U + 1,) events per user_idx
    train_count: np.ndarray  # (I + 1,) occurrences per item_idx in training prefixes
    users_with_rows: int = 0
    users_eval: int = 0
    rating_min: float | None = None
    rating_max: float | None = None

    @property
    def interactions(self) -> int:
        return int(self.n_interactions.sum())


def write_splits(batches: Iterable[pa.Table], out: Path, n_users: int, n_items: int) -> SplitCounts:
    """SEQUENCES batches in ascending user_idx -> sequences/train/valid/test.parquet."""
    counts = SplitCounts(np.zeros(n_users + 1, np.int64), np.zeros(n_items + 1, np.int64))
    names = {
        "sequences": events.SEQUENCES,
        "train": events.TRAIN,
        "valid": events.HELDOUT,
        "test": events.HELDOUT,
    }
    sinks = {name: ParquetSink(out / f"{name}.parquet", schema) for name, schema in names.items()}
    last = 0
    for batch in batches:
        idx = batch["user_idx"].to_numpy()
        if idx[0] <= last or np.any(np.diff(idx) <= 0):
            raise RuntimeError("sequences arrive out of user_idx order")
        last = int(idx[-1])
        counts.n_interactions[idx] = pc.list_value_length(batch["items"]).to_numpy()
        _update_rating_range(counts, pc.list_flatten(batch["ratings"]))
        train, valid, test = events.split_leave_one_out(batch)
        flat = pc.list_flatten(train["items"]).to_numpy()
        counts.train_count += np.bincount(flat, minlength=n_items + 1)
        for name, table in (
            ("sequences", batch),
            ("train", train),
            ("valid", valid),
            ("test", test),
        ):
            sinks[name].write(table)
    for sink in sinks.values():
        sink.close()
    counts.users_with_rows, counts.users_eval = sinks["sequences"].rows, sinks["valid"].rows
    return counts


def _update_rating_range(counts: SplitCounts, ratings: pa.Array) -> None:
    if len(ratings) == 0:
        return
    lo, hi = (v.as_py() for v in pc.min_max(ratings).values())
    counts.rating_min = lo if counts.rating_min is None else min(counts.rating_min, lo)
    counts.rating_max = hi if counts.rating_max is None else max(counts.rating_max, hi)


def write_pairs(sorted_partials: Iterable[pa.Table], path: Path) -> int:
    """Partial (key, count) batches in ascending key order -> cross_sell.parquet; returns its rows."""
    with ParquetSink(path, events.PAIRS) as sink:
        for table in events.merge_sorted_counts(sorted_partials):
            sink.write(table)
    return sink.rows


def write_id_table(path: Path, kind: str, ids: list[str], count: tuple, feature_cols: dict) -> None:
    """users.parquet / items.parquet: `<kind>_idx` 1..N, `<kind>_id`, a count column, features."""
    name, values, dtype = count
    cols = {
        f"{kind}_idx": pa.array(np.arange(1, len(ids) + 1), pa.int32()),
        f"{kind}_id": pa.array(ids, pa.string()),
        name: pa.array(values, dtype),
        **feature_cols,
    }
    write_table(path, pa.table(cols))
