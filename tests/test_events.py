"""Per-user ordering, duplicates, leave-one-out, indices, cross-sell pairs (p5ray/events.py): no Ray."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p5ray.ingest import events
from p5ray.ingest.parsers import EVENT_SCHEMA

ROLES = ("timestamp", "rating", "event")


def evs(rows, file=0):
    """rows: (line, user, item, ts, rating, event[, pos]) -> valid events."""
    cols = {name: [] for name in EVENT_SCHEMA.names}
    for r in rows:
        line, user, item, ts, rating, event, *pos = r
        f = file if not isinstance(line, tuple) else line[0]
        line = line if not isinstance(line, tuple) else line[1]
        for k, v in zip(
            (
                "file",
                "line",
                "pos",
                "user_id",
                "item_id",
                "timestamp",
                "rating",
                "event",
                "reason",
                "raw",
            ),
            (f, line, pos[0] if pos else 0, user, item, ts, rating, event, None, None),
            strict=True,
        ):
            cols[k].append(v)
    return pa.table(cols, schema=EVENT_SCHEMA)


def ordered(rows, roles=ROLES, drop_short=False):
    table = events.valid_events_with_bucket(evs(rows), 1).drop_columns(["bucket"])
    return {r["user_id"]: r for r in events.order_user_events(table, roles, drop_short).to_pylist()}


def test_ties_keep_file_order_never_item_order():
    users = ordered(
        [
            (1, "u", "zz", 100, 1.0, None),
            (2, "u", "aa", 100, 2.0, None),
            (3, "u", "mm", 50, 3.0, None),
            ((1, 1), "u", "bb", 100, 4.0, None),
            ((0, 9), "u", "cc", 100, 5.0, None),
        ]
    )
    assert users["u"]["items"] == ["mm", "zz", "aa", "cc", "bb"]
    assert users["u"]["timestamps"] == [50, 100, 100, 100, 100]
    assert users["u"]["ratings"] == [3.0, 1.0, 2.0, 5.0, 4.0]


def test_exact_duplicates_are_dropped_keeping_the_first():
    users = ordered(
        [
            (1, "u", "a", 10, 5.0, "view"),
            (2, "u", "b", 10, 4.0, "view"),
            (3, "u", "a", 10, 5.0, "view"),
            (4, "u", "a", 10, 5.0, "purchase"),
            (5, "u", "a", 11, 5.0, "view"),
        ]
    )
    assert users["u"]["items"] == ["a", "b", "a", "a"]
    assert users["u"]["events"] == ["view", "view", "purchase", "view"]
    assert users["u"]["n_duplicates"] == 1


def test_without_timestamps_repeats_are_events_not_duplicates():
    users = ordered(
        [
            (1, "u", "a", None, None, None, 1),
            (1, "u", "a", None, None, None, 2),
            (1, "u", "b", None, None, None, 3),
        ],
        roles=(),
    )
    assert users["u"]["items"] == ["a", "a", "b"] and users["u"]["n_duplicates"] == 0
    assert users["u"]["timestamps"] is None and users["u"]["ratings"] is None


def test_short_users_are_flagged_only_under_the_drop_policy():
    rows = [
        (1, "one", "a", 1, 1.0, None),
        (2, "two", "a", 1, 1.0, None),
        (3, "two", "b", 2, 1.0, None),
    ]
    rows += [(4 + i, "three", f"i{i}", i, 1.0, None) for i in range(3)]
    kept = ordered(rows)
    dropped = ordered(rows, drop_short=True)
    assert not any(u["dropped"] for u in kept.values())
    assert {u: r["dropped"] for u, r in dropped.items()} == {
        "one": True,
        "two": True,
        "three": False,
    }


def test_bucket_is_a_function_of_the_user_only():
    rows = [(i, f"u{i % 7}", "a", i, 1.0, None) for i in range(50)]
    a = events.valid_events_with_bucket(evs(rows), 4).to_pylist()
    b = events.valid_events_with_bucket(evs(rows[::-1]), 4).to_pylist()
    bucket_a = {r["user_id"]: r["bucket"] for r in a}
    assert bucket_a == {r["user_id"]: r["bucket"] for r in b}
    assert len(set(bucket_a.values())) > 1


def sequences(lists, ratings=None):
    return pa.table(
        {
            "user_idx": pa.array(range(1, len(lists) + 1), pa.int32()),
            "items": pa.array(lists, pa.list_(pa.int32())),
            "timestamps": pa.nulls(len(lists), pa.list_(pa.int64())),
            "ratings": pa.array(ratings, pa.list_(pa.float32()))
            if ratings
            else pa.nulls(len(lists), pa.list_(pa.float32())),
            "events": pa.nulls(len(lists), pa.list_(pa.string())),
        },
        schema=events.SEQUENCES,
    )


def test_leave_one_out_split():
    seq = sequences(
        [[5], [5, 6], [5, 6, 7], [1, 2, 3, 4, 9]], ratings=[[1], [1, 2], [1, 2, 3], [1, 2, 3, 4, 5]]
    )
    train, valid, test = events.split_leave_one_out(seq)
    assert train.to_pydict()["items"] == [[5], [5, 6], [5], [1, 2, 3]]
    assert train.to_pydict()["ratings"] == [[1], [1, 2], [1], [1, 2, 3]]
    assert valid.to_pydict() == {
        "user_idx": [3, 4],
        "history": [[5], [1, 2, 3]],
        "target": [6, 4],
        "target_rating": [2.0, 4.0],
    }
    assert test.to_pydict() == {
        "user_idx": [3, 4],
        "history": [[5, 6], [1, 2, 3, 4]],
        "target": [7, 9],
        "target_rating": [3.0, 5.0],
    }


def test_split_without_ratings_gives_null_ratings():
    train, valid, _ = events.split_leave_one_out(sequences([[1, 2, 3]]))
    assert train["ratings"].null_count == 1 and valid["target_rating"].null_count == 1


def test_index_user_rows_uses_vocab_positions_and_skips_dropped():
    rows = pa.table(
        {
            "user_id": ["b", "a", "c"],
            "items": [["y", "x"], ["x"], ["z"]],
            "timestamps": pa.nulls(3, pa.list_(pa.int64())),
            "ratings": pa.nulls(3, pa.list_(pa.float32())),
            "events": pa.nulls(3, pa.list_(pa.string())),
            "n_duplicates": pa.array([0, 0, 0], pa.int32()),
            "dropped": [False, False, True],
        },
        schema=events.USER_ROWS,
    )
    seq = events.index_user_rows(rows, pa.array(["a", "b"]), pa.array(["x", "y"]))
    assert seq.to_pydict()["user_idx"] == [2, 1]
    assert seq.to_pydict()["items"] == [[2, 1], [1]]


def test_pairs_come_from_training_prefixes_only():
    seq = sequences([[1, 2, 3, 4, 5], [1, 2, 9, 9], [7, 7, 8, 8]])
    counts = events.pair_counts(seq, None).to_pydict()
    pairs = {
        (k >> 32, k & 0xFFFFFFFF): c for k, c in zip(counts["key"], counts["count"], strict=True)
    }
    assert pairs == {(1, 2): 2, (2, 3): 1}  # 4 and 5 are held out; (7, 7) is no cross-sell


def test_pairs_follow_the_cross_sell_event_types():
    seq = sequences([[1, 2, 3, 4, 5, 6, 7]]).set_column(
        4,
        "events",
        pa.array(
            [["purchase", "view", "purchase", "purchase", "view", "x", "y"]], pa.list_(pa.string())
        ),
    )
    counts = events.pair_counts(seq, ("purchase",)).to_pydict()
    assert [(k >> 32, k & 0xFFFFFFFF) for k in counts["key"]] == [(1, 3), (3, 4)]


def test_merge_sorted_counts_across_batch_boundaries():
    key = lambda a, b: (a << 32) | b  # noqa: E731
    batches = [
        pa.table({"key": [key(1, 2), key(1, 3)], "count": [1, 2]}),
        pa.table({"key": [key(1, 3), key(1, 3)], "count": [1, 1]}),
        pa.table({"key": pa.array([], pa.int64()), "count": pa.array([], pa.int64())}),
        pa.table({"key": [key(1, 3), key(2, 1)], "count": [5, 1]}),
    ]
    out = pa.concat_tables(list(events.merge_sorted_counts(batches)))
    assert out.to_pydict() == {"item_a": [1, 1, 2], "item_b": [2, 3, 1], "count": [1, 9, 1]}
    assert out.schema == events.PAIRS


def test_list_helpers():
    lists = pa.array([[1, 2, 3], [4], [5, 6]], pa.list_(pa.int32()))
    assert events.list_prefix(lists, np.array([2, 0, 2])).to_pylist() == [[1, 2], [], [5, 6]]
    assert events.list_item(lists, np.array([2, 0, 1])).to_pylist() == [3, 4, 6]
    assert pc.list_value_length(events.list_prefix(lists, np.array([3, 1, 0]))).to_pylist() == [
        3,
        1,
        0,
    ]
