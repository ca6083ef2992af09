"""Byte-stable Parquet, quarantine CSV, atomic output (p5ray/outputs.py): no Ray."""

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p5ray.errors import OutputExistsError, UserError
from p5ray.ingest import outputs

SCHEMA = pa.schema([("a", pa.int32()), ("b", pa.list_(pa.int32()))])


def test_parquet_bytes_do_not_depend_on_how_rows_were_batched(tmp_path):
    rows = pa.table(
        {"a": pa.array(range(1000), pa.int32()), "b": [[i, i + 1] for i in range(1000)]},
        schema=SCHEMA,
    )
    for name, cuts in (("one", [1000]), ("many", [1, 7, 300, 2, 690])):
        with outputs.ParquetSink(tmp_path / f"{name}.parquet", SCHEMA, rows_per_group=128) as sink:
            start = 0
            for n in cuts:
                sink.write(rows.slice(start, n))
                start += n
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "many.parquet").read_bytes()
    assert pq.ParquetFile(tmp_path / "one.parquet").metadata.num_row_groups == 8


def test_an_empty_sink_still_writes_the_schema(tmp_path):
    outputs.ParquetSink(tmp_path / "e.parquet", SCHEMA).close()
    assert pq.read_table(tmp_path / "e.parquet").schema == SCHEMA


def test_quarantine_csv_is_sorted_and_escapes_control_characters(tmp_path):
    rows = pa.table(
        {
            "file": pa.array([1, 0, 0], pa.int32()),
            "line": pa.array([2, 9, 3], pa.int64()),
            "pos": pa.array([0, 0, 0], pa.int32()),
            "reason": ["bad_json", "binary_data", "bad_rating"],
            "raw": ['{"a', "x\x00y", 'u,"i,1",x'],
        }
    )
    path = tmp_path / "q" / "rows.csv"
    outputs.write_quarantine(path, rows, ("a.csv", "b.csv"))
    got = list(csv.reader(path.open()))
    assert got == [
        ["source", "line", "reason", "raw"],
        ["a.csv", "3", "bad_rating", 'u,"i,1",x'],
        ["a.csv", "9", "binary_data", "x\\x00y"],
        ["b.csv", "2", "bad_json", '{"a'],
    ]


def test_staging_leaves_nothing_behind_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), outputs.staging_dir(out, overwrite=False) as tmp:
        (tmp / "half.parquet").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with outputs.staging_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_out(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        outputs.check_out(tmp_path / "exists", False, [])
    outputs.check_out(tmp_path / "exists", True, [])
    with pytest.raises(UserError, match="would replace the input"):
        outputs.check_out(tmp_path, True, [str(tmp_path / "exists" / "log.csv")])
