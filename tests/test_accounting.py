"""Row accounting and the bad-fraction verdict (p5ray/accounting.py): no Ray."""

import pyarrow as pa
import pytest

from p5ray import accounting
from p5ray.errors import DataError
from p5ray.parsers import LogSpec, parse_lines

CSV = LogSpec(
    "csv",
    "delimited",
    files=("a.csv", "b.csv"),
    delimiter=",",
    header=("user_id", "item_id"),
    n_fields=2,
    quoted=True,
    fields={"user": 0, "item": 1},
)


def stats_of(*batches):
    """batches: (file, [raw lines]) parsed separately, as separate Ray blocks would be."""
    parsed = []
    for file, raw in batches:
        table = pa.table(
            {
                "file": pa.array([file] * len(raw), pa.int32()),
                "line": pa.array(range(2, 2 + len(raw)), pa.int64()),
                "raw": raw,
            }
        )
        parsed.append(accounting.summarize_events(parse_lines(table, CSV)).to_pylist()[0])
    return accounting.combine(parsed)


def test_counts_add_up_and_the_first_bad_row_is_the_earliest():
    stats = stats_of((1, ["u,i", "bad", ""]), (0, ["u,i", "u,i", "u,i,x", ""]))
    assert stats.rows_in == 7 and stats.valid == 3 and stats.blank == 2
    assert stats.quarantined == {"wrong_field_count": 2}
    assert stats.first_bad[:4] == (0, 4, 0, "wrong_field_count")


def test_verdicts():
    accounting.check_rows(stats_of((0, ["u,i"] * 99 + ["bad"])), CSV, max_bad_fraction=0.01)
    with pytest.raises(DataError) as err:
        accounting.check_rows(
            stats_of((0, ["u,i"] * 98 + ["bad", "u\ti"])), CSV, max_bad_fraction=0.01
        )
    line = err.value.one_line()
    assert line.startswith("a.csv:100: 2 of 100 rows are bad") and "wrong number of fields" in line
    with pytest.raises(DataError, match="no row could be read") as err:
        accounting.check_rows(stats_of((1, ["u\ti", "v\tj"])), CSV, max_bad_fraction=1.0)
    assert (
        err.value.path == "b.csv"
        and err.value.line == 2
        and "tab-separated" in err.value.one_line()
    )
    with pytest.raises(DataError, match="no data rows"):
        accounting.check_rows(stats_of((0, ["", " "])), CSV, max_bad_fraction=1.0)


def test_row_counts_add_up_or_refuse():
    stats = stats_of((0, ["u,i", "u,i", "bad", ""]))
    users = {"duplicates": 1, "rows_dropped_short": 0, "users_dropped": 0, "rows_kept": 1}
    out = accounting.row_counts(stats, users, kept=1, users_with_rows=1, users_eval=0)
    assert (out["rows_in"], out["rows_kept"], out["rows_quarantined"], out["rows_dropped"]) == (4, 1, 1, 2)
    assert out["dropped_by_reason"] == {"blank_line": 1, "duplicate": 1, "short_user": 0}
    with pytest.raises(RuntimeError, match="does not add up"):
        accounting.row_counts(stats, {**users, "duplicates": 0}, kept=1, users_with_rows=1, users_eval=0)
