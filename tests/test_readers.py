"""Finding, sniffing and reading logs in byte ranges (p5ray/readers.py): pure, no Ray."""

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p5ray.errors import DataError
from p5ray.ingest import formats, readers
from p5ray.ingest.parsers import parse_lines

FIXTURES = Path(__file__).parent / "fixtures" / "prepare"
DATA = Path(__file__).parent.parent / "data"


def read_all(spec, chunk_bytes=64):
    """Every (file, line, raw) the read tasks produce, in order."""
    out = []
    for r in readers.plan_ranges(spec, chunk_bytes):
        for t in readers.read_range(r, spec):
            out += list(
                zip(t["file"].to_pylist(), t["line"].to_pylist(), t["raw"].to_pylist(), strict=True)
            )
    return out


def events(path, fmt="auto", chunk_bytes=64, **cols):
    spec = formats.resolve(str(path), fmt, cols)
    tables = [
        parse_lines(t, spec)
        for r in readers.plan_ranges(spec, chunk_bytes)
        for t in readers.read_range(r, spec)
    ]
    ev = pa.concat_tables(tables).sort_by(
        [("file", "ascending"), ("line", "ascending"), ("pos", "ascending")]
    )
    return spec, ev.to_pylist()


def test_ranges_cover_every_line_once_with_its_number(tmp_path):
    text = "".join(f"u{i} i{i} i{i + 1}\n" for i in range(1, 400))
    path = tmp_path / "seq.txt"
    path.write_text(text)
    spec = formats.resolve(str(path), "sequence")
    ranges = readers.plan_ranges(spec, chunk_bytes=100)
    assert len(ranges) > 20
    assert [r.start for r in ranges[1:]] == [r.end for r in ranges[:-1]]
    got = read_all(spec, chunk_bytes=100)
    assert got == [(0, i + 1, line) for i, line in enumerate(text.splitlines())]


def test_bom_crlf_and_header_are_handled_in_every_range():
    spec = formats.resolve(str(FIXTURES / "messy.csv"))
    assert spec.format == "csv" and spec.header[0] == "user_id"
    got = read_all(spec, chunk_bytes=16)
    assert got[0] == (0, 2, "007,i9,100,5,view")
    assert all(not raw.endswith("\r") for _, _, raw in got)
    assert [line for _, line, _ in got] == list(range(2, 22))


def test_gzip_reads_like_the_plain_file(tmp_path):
    gz = tmp_path / "messy.csv.gz"
    gz.write_bytes(gzip.compress((FIXTURES / "messy.csv").read_bytes()))
    assert events(gz)[1] == events(FIXTURES / "messy.csv")[1]


def test_latin1_file_and_non_ascii_ids():
    spec, ev = events(FIXTURES / "latin1.tsv")
    assert spec.format == "tsv"
    assert {(e["user_id"], e["item_id"]) for e in ev} == {
        ("josé", "café"),
        ("josé", "naïve"),
        ("renée", "café"),
    }


def test_movielens_variants_map_their_columns():
    _, dat = events(FIXTURES / "ratings.dat")
    assert (dat[0]["user_id"], dat[0]["item_id"], dat[0]["rating"], dat[0]["timestamp"]) == (
        "1",
        "1193",
        5.0,
        978300760,
    )
    _, csv_rows = events(FIXTURES / "ratings.csv")
    assert csv_rows[2]["rating"] == 0.5 and csv_rows[2]["line"] == 4
    assert csv_rows[4]["reason"] == "rating_out_of_range"


def test_generic_columns_are_mapped_with_flags(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("who,what,when,stars\nu1,i1,5,4\n")
    spec, ev = events(path, "csv", user="who", item="what", timestamp="when", rating="stars")
    assert spec.fields == {"user": 0, "item": 1, "timestamp": 2, "rating": 3}
    assert (ev[0]["user_id"], ev[0]["timestamp"], ev[0]["rating"]) == ("u1", 5, 4.0)
    with pytest.raises(DataError, match="no column 'rating'"):
        formats.resolve(str(path), "csv", {"user": "who", "item": "what", "rating": "rating"})


def test_parquet_rows_are_numbered_per_file(tmp_path):
    path = tmp_path / "log.parquet"
    table = pa.table(
        {
            "user_id": pa.array([1, 1, 2]),
            "item_id": ["007", "7", "x"],
            "timestamp": pa.array([10, 20, 30], pa.timestamp("s")),
            "rating": [1.0, None, 3.0],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    spec, ev = events(path)
    assert spec.format == "parquet" and len(readers.plan_ranges(spec)) == 2
    assert [(e["line"], e["user_id"], e["item_id"], e["timestamp"]) for e in ev] == [
        (1, "1", "007", 10),
        (2, "1", "7", 20),
        (3, "2", "x", 30),
    ]
    assert [e["reason"] for e in ev] == [None, "missing_rating", None]


@pytest.mark.parametrize("chunk", [1, 2, 7, 33, 10_000])
def test_any_chunk_size_without_a_final_newline(tmp_path, chunk):
    path = tmp_path / "log.tsv"
    path.write_bytes(b"user_id\titem_id\r\nu1\ti1\r\n\r\nu2\ti\xe92\r\nu3\ti3")
    spec = formats.resolve(str(path), "tsv")
    assert read_all(spec, chunk_bytes=chunk) == [
        (0, 2, "u1\ti1"),
        (0, 3, ""),
        (0, 4, "u2\tié2"),
        (0, 5, "u3\ti3"),
    ]
