"""Lines -> typed events with reasons (p5ray/parsers.py): pure, no Ray."""

import numpy as np
import pyarrow as pa
import pytest

from p5ray.ingest.parsers import EVENT_SCHEMA, LogSpec, parse_floats, parse_integers, parse_lines

CSV = LogSpec(
    "csv",
    "delimited",
    delimiter=",",
    n_fields=4,
    quoted=True,
    fields={"user": 0, "item": 1, "timestamp": 2, "rating": 3},
)
TAB = LogSpec(
    "movielens",
    "delimited",
    delimiter="\t",
    n_fields=4,
    fields={"user": 0, "item": 1, "rating": 2, "timestamp": 3},
    rating_range=(0.5, 5.0),
)
SEQ = LogSpec("sequence", "sequence", fields={"user": 0, "item": 1})


def lines(*raw, file=0, first=1):
    return pa.table(
        {
            "file": pa.array([file] * len(raw), pa.int32()),
            "line": pa.array(range(first, first + len(raw)), pa.int64()),
            "raw": pa.array(list(raw), pa.string()),
        }
    )


def by_line(events):
    return {
        r["line"]: r
        for r in events.sort_by([("line", "ascending"), ("pos", "ascending")]).to_pylist()
    }


def test_valid_rows_are_typed_and_ids_stay_strings():
    ev = parse_lines(lines("007,i1,100,4.5", "7,0042,101,3"), CSV)
    assert ev.schema == EVENT_SCHEMA
    rows = by_line(ev)
    assert (rows[1]["user_id"], rows[1]["item_id"], rows[1]["timestamp"], rows[1]["rating"]) == (
        "007",
        "i1",
        100,
        4.5,
    )
    assert (rows[2]["user_id"], rows[2]["item_id"]) == ("7", "0042")
    assert all(r["reason"] is None and r["raw"] is None for r in rows.values())


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("u1,i1,100", "wrong_field_count"),
        ("u1,i1,100,4,extra", "wrong_field_count"),
        ('u1,"i1,100,4', "unclosed_quote"),
        (",i1,100,4", "missing_user_id"),
        ("u1, ,100,4", "missing_item_id"),
        ("u1,i1,,4", "missing_timestamp"),
        ("u1,i1,2021-01-01,4", "bad_timestamp"),
        ("u1,i1,100,", "missing_rating"),
        ("u1,i1,100,five", "bad_rating"),
        ("u1,i1,100,nan", "bad_rating"),
        ("u1,i1,100,inf", "bad_rating"),
        ("u1\x00,i1,100,4", "binary_data"),
    ],
)
def test_bad_rows_carry_reason_line_and_raw(raw, reason):
    ev = parse_lines(lines("u0,i0,1,1", raw), CSV)
    rows = by_line(ev)
    assert rows[1]["reason"] is None
    assert rows[2]["reason"] == reason
    assert rows[2]["raw"] == raw


def test_blank_lines_are_dropped_not_bad():
    rows = by_line(parse_lines(lines("u1,i1,1,1", "   ", ""), CSV))
    assert [rows[i]["reason"] for i in (1, 2, 3)] == [None, "blank_line", "blank_line"]


def test_quoted_fields_keep_delimiters_inside():
    rows = by_line(parse_lines(lines('u1,"i,7",5,"4"', '"u ""2""",i8,6,1'), CSV))
    assert rows[1]["item_id"] == "i,7" and rows[1]["rating"] == 4.0
    assert rows[2]["user_id"] == 'u "2"'


def test_rating_out_of_range_uses_the_format_range():
    rows = by_line(parse_lines(lines("1\t2\t5\t10", "1\t3\t6\t11", "1\t4\t0\t12"), TAB))
    assert [rows[i]["reason"] for i in (1, 2, 3)] == [
        None,
        "rating_out_of_range",
        "rating_out_of_range",
    ]


def test_a_column_numeric_for_thousands_of_rows_then_text_costs_only_that_row():
    raw = [f"u{i % 50},i{i},{1000 + i},{1 + i % 5}" for i in range(5000)] + ["u1,i9,9999,five"]
    ev = parse_lines(lines(*raw), CSV)
    bad = ev.filter(pa.compute.is_valid(ev["reason"])).to_pylist()
    assert [(b["line"], b["reason"]) for b in bad] == [(5001, "bad_rating")]
    good = ev.filter(pa.compute.is_null(ev["reason"]))
    assert good.num_rows == 5000 and good["rating"].type == pa.float32()


def test_wrong_delimiter_yields_no_valid_row():
    ev = parse_lines(lines("u1\ti1\t100\t4", "u2\ti2\t101\t5"), CSV)
    assert ev["reason"].to_pylist() == ["wrong_field_count"] * 2


def test_sequence_lines_explode_with_positions():
    ev = parse_lines(lines("u1 i1 i2  i1", "u2", "  u3\ti9 "), SEQ)
    got = [
        (r["line"], r["pos"], r["user_id"], r["item_id"], r["reason"])
        for r in ev.sort_by([("line", "ascending"), ("pos", "ascending")]).to_pylist()
    ]
    assert got == [
        (1, 1, "u1", "i1", None),
        (1, 2, "u1", "i2", None),
        (1, 3, "u1", "i1", None),
        (2, 0, None, None, "no_items"),
        (3, 1, "u3", "i9", None),
    ]


def test_json_lines_keep_number_text_and_accept_python_literals():
    spec = LogSpec(
        "amazon-json",
        "json",
        fields={
            "user": "reviewerID",
            "item": "asin",
            "rating": "overall",
            "timestamp": "unixReviewTime",
        },
        rating_range=(1.0, 5.0),
    )
    ev = parse_lines(
        lines(
            '{"reviewerID": 12, "asin": "0001", "overall": 5.0, "unixReviewTime": 1400000000}',
            "{'reviewerID': 'A2', 'asin': '0002', 'overall': 3, 'unixReviewTime': 1}",
            '{"reviewerID": "A3", "asin": ["x"], "overall": 3, "unixReviewTime": 1}',
            '{"reviewerID": "A3"',
            "[1, 2]",
        ),
        spec,
    )
    rows = by_line(ev)
    assert (rows[1]["user_id"], rows[1]["item_id"], rows[1]["rating"]) == ("12", "0001", 5.0)
    assert rows[2]["user_id"] == "A2" and rows[2]["reason"] is None
    assert [rows[i]["reason"] for i in (3, 4, 5)] == ["missing_item_id", "bad_json", "bad_json"]


def test_events_are_lowercased_and_optional():
    spec = LogSpec(
        "csv",
        "delimited",
        delimiter=",",
        n_fields=3,
        quoted=True,
        fields={"user": 0, "item": 1, "event": 2},
    )
    rows = by_line(parse_lines(lines("u1,i1, Purchase ", "u1,i2,"), spec))
    assert rows[1]["event"] == "purchase"
    assert rows[2]["event"] is None and rows[2]["reason"] is None


def test_number_parsing_value_by_value():
    ints, ok = parse_integers(
        pa.array(["881250949", "-5", "1.6e9", "+7", "12abc", "", None, "1e30"])
    )
    assert ok.tolist() == [True, True, True, True, False, False, False, False]
    assert ints[:4].tolist() == [881250949, -5, 1600000000, 7]
    floats, ok = parse_floats(pa.array(["4.5", ".5", "1e1", "-inf", "NaN", "x"]))
    assert ok.tolist() == [True, True, True, False, False, False]
    assert np.allclose(floats[:3], [4.5, 0.5, 10.0])
