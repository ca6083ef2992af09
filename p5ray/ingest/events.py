"""Valid events -> per-user sequences -> leave-one-out splits and cross-sell pairs.

Plain functions on pyarrow tables. `order_user_events` gets every event of the users it sees
(Ray Data groups events by a hash bucket of the user id) and orders each user's events by
(timestamp, file, line, position in line): ties keep the file order and never look at item ids.
Exact duplicates (same user, item, timestamp, rating and event) are dropped, first kept.

Notation: a user with n events e_1..e_n (time order) has the training prefix e_1..e_{n-2},
the validation target e_{n-1} and the test target e_n when n >= 3; a user with n < 3 is
train-only (the whole sequence is the prefix) or dropped, by policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MIN_EVAL_LEN = 3
_ORDER = [
    ("user_id", "ascending"),
    ("timestamp", "ascending"),
    ("file", "ascending"),
    ("line", "ascending"),
    ("pos", "ascending"),
]
_DUP_KEYS = ["user_id", "item_id", "timestamp", "rating", "event"]

USER_ROWS = pa.schema(
    [
        ("user_id", pa.string()),
        ("items", pa.list_(pa.string())),
        ("timestamps", pa.list_(pa.int64())),
        ("ratings", pa.list_(pa.float32())),
        ("events", pa.list_(pa.string())),
        ("n_duplicates", pa.int32()),
        ("dropped", pa.bool_()),
    ]
)
SEQUENCES = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())),
        ("ratings", pa.list_(pa.float32())),
        ("events", pa.list_(pa.string())),
    ]
)
TRAIN = pa.schema(
    [("user_idx", pa.int32()), ("items", pa.list_(pa.int32())), ("ratings", pa.list_(pa.float32()))]
)
HELDOUT = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("history", pa.list_(pa.int32())),
        ("target", pa.int32()),
        ("target_rating", pa.float32()),
    ]
)
PAIRS = pa.schema([("item_a", pa.int32()), ("item_b", pa.int32()), ("count", pa.int32())])


def valid_events_with_bucket(events: pa.Table, n_buckets: int) -> pa.Table:
    """Keep valid events and add `bucket` (a stable hash of the user id): a user's events share one."""
    good = events.filter(pc.is_null(events["reason"])).drop_columns(["reason", "raw"])
    users = pc.dictionary_encode(good["user_id"]).combine_chunks()
    hashes = pd.util.hash_array(users.dictionary.to_numpy(zero_copy_only=False), categorize=False)
    bucket = (hashes % np.uint64(max(1, n_buckets))).astype(np.int32)
    return good.append_column("bucket", pa.array(bucket[users.indices.to_numpy()], pa.int32()))


def order_user_events(events: pa.Table, roles: tuple[str, ...], drop_short: bool) -> pa.Table:
    """Events of complete users -> one USER_ROWS row per user, events in time order, duplicates out.

    `roles`: which optional columns the log has ("timestamp", "rating", "event"); the others
    become null lists. Duplicates are only recognisable, and only dropped, with timestamps.
    """
    if events.num_rows == 0:
        return USER_ROWS.empty_table()
    events = events.sort_by(_ORDER)
    n_raw = np.diff(np.append(_starts(events["user_id"]), events.num_rows))
    if "timestamp" in roles:
        events = _drop_duplicates(events)
    starts = _starts(events["user_id"])
    n = np.diff(np.append(starts, events.num_rows))
    offsets = pa.array(np.append(starts, events.num_rows).astype(np.int32))
    return pa.table(
        {
            "user_id": pc.take(events["user_id"], pa.array(starts)),
            "items": _lists(offsets, events["item_id"]),
            "timestamps": _lists(offsets, events["timestamp"], "timestamp" in roles),
            "ratings": _lists(offsets, events["rating"], "rating" in roles),
            "events": _lists(offsets, events["event"], "event" in roles),
            "n_duplicates": pa.array((n_raw - n).astype(np.int32)),
            "dropped": pa.array(drop_short & (n < MIN_EVAL_LEN)),
        },
        schema=USER_ROWS,
    )


def _starts(user_id: pa.ChunkedArray) -> np.ndarray:
    users = user_id.combine_chunks() if isinstance(user_id, pa.ChunkedArray) else user_id
    if len(users) == 0:
        return np.zeros(0, np.int64)
    change = pc.not_equal(users.slice(1), users.slice(0, len(users) - 1)).to_numpy(
        zero_copy_only=False
    )
    return np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)


def _drop_duplicates(events: pa.Table) -> pa.Table:
    rows = events.append_column("_row", pa.array(np.arange(events.num_rows)))
    first = rows.group_by(_DUP_KEYS, use_threads=False).aggregate([("_row", "min")])["_row_min"]
    keep = np.zeros(events.num_rows, bool)
    keep[first.to_numpy()] = True
    return events.filter(pa.array(keep))


def _lists(offsets: pa.Array, values: pa.ChunkedArray, keep: bool = True) -> pa.Array:
    """A list per user, or a null per user where the log has no such column."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    out_type = pa.list_(values.type)
    if not keep:
        return pa.nulls(len(offsets) - 1, out_type)
    return pa.ListArray.from_arrays(offsets, values, type=out_type)


def index_user_rows(rows: pa.Table, user_vocab: pa.Array, item_vocab: pa.Array) -> pa.Table:
    """USER_ROWS (kept users) -> SEQUENCES: raw ids replaced by indices (position in vocab + 1)."""
    rows = rows.filter(pc.invert(rows["dropped"]))
    user_idx = pc.index_in(rows["user_id"], value_set=user_vocab)
    items = rows["items"].combine_chunks()
    item_idx = pc.index_in(pc.list_flatten(items), value_set=item_vocab)
    if user_idx.null_count or item_idx.null_count:
        raise ValueError("an id is missing from the vocabulary")  # a bug, not bad input
    lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table(
        {
            "user_idx": pc.cast(pc.add(user_idx, 1), pa.int32()),
            "items": pa.ListArray.from_arrays(offsets, pc.cast(pc.add(item_idx, 1), pa.int32())),
            "timestamps": rows["timestamps"],
            "ratings": rows["ratings"],
            "events": rows["events"],
        },
        schema=SEQUENCES,
    )


def split_leave_one_out(seq: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """SEQUENCES -> (train, valid, test): prefix e_1..e_{n-2} (all of it when n < 3), targets e_{n-1}, e_n."""
    items, ratings = _chunk(seq["items"]), _chunk(seq["ratings"])
    n = pc.list_value_length(items).to_numpy(zero_copy_only=False)
    evaluable = n >= MIN_EVAL_LEN
    train_len = train_lengths(items)
    train = pa.table(
        {
            "user_idx": seq["user_idx"],
            "items": list_prefix(items, train_len),
            "ratings": _prefix_or_null(ratings, train_len),
        },
        schema=TRAIN,
    )
    sub = seq.filter(pa.array(evaluable))
    items, ratings, n = _chunk(sub["items"]), _chunk(sub["ratings"]), n[evaluable]
    held = []
    for history_len in (n - 2, n - 1):
        held.append(
            pa.table(
                {
                    "user_idx": sub["user_idx"],
                    "history": list_prefix(items, history_len),
                    "target": list_item(items, history_len),
                    "target_rating": _item_or_null(ratings, history_len),
                },
                schema=HELDOUT,
            )
        )
    return train, held[0], held[1]


def train_lengths(items: pa.Array) -> np.ndarray:
    """Length of each training prefix: n - 2 for evaluable users, n for the others."""
    n = pc.list_value_length(items).to_numpy(zero_copy_only=False)
    return np.where(n >= MIN_EVAL_LEN, n - 2, n)


def pair_counts(seq: pa.Table, cross_sell_events: tuple[str, ...] | None) -> pa.Table:
    """Consecutive (a, b) pairs inside training prefixes, counted: `key` = a << 32 | b, `count`.

    With `cross_sell_events`, pairs are taken from the subsequence of events of those types
    (a purchase and the next purchase). Pairs of an item with itself are left out.
    """
    items = _chunk(seq["items"])
    lengths = train_lengths(items)
    row, place = _positions(items)
    keep = place < lengths[row]
    if cross_sell_events is not None:
        events = pc.list_flatten(_chunk(seq["events"]))
        keep &= pc.fill_null(
            pc.is_in(events, value_set=pa.array(cross_sell_events, pa.string())), False
        ).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(items).to_numpy(zero_copy_only=False)[keep].astype(np.int64)
    row = row[keep]
    same = (row[1:] == row[:-1]) & (values[1:] != values[:-1])
    keys, counts = np.unique((values[:-1][same] << 32) | values[1:][same], return_counts=True)
    return pa.table({"key": pa.array(keys, pa.int64()), "count": pa.array(counts, pa.int64())})


def merge_sorted_counts(batches: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """Partial (key, count) tables in ascending key order -> PAIRS tables, one row per key."""
    carry_key, carry_count = None, 0
    for batch in batches:
        keys = batch["key"].to_numpy()
        counts = batch["count"].to_numpy()
        if carry_key is not None:
            keys, counts = np.append(carry_key, keys), np.append(carry_count, counts)
        if len(keys) == 0:
            continue
        if np.any(np.diff(keys) < 0):
            raise ValueError("pair counts arrive out of order")
        starts = np.flatnonzero(np.append(True, np.diff(keys) != 0))
        merged_keys, merged = keys[starts], np.add.reduceat(counts, starts)
        carry_key, carry_count = merged_keys[-1], merged[-1]
        if len(merged_keys) > 1:
            yield _pairs(merged_keys[:-1], merged[:-1])
    if carry_key is not None:
        yield _pairs(np.array([carry_key]), np.array([carry_count]))


def _pairs(keys: np.ndarray, counts: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "item_a": pa.array((keys >> 32).astype(np.int32)),
            "item_b": pa.array((keys & 0xFFFFFFFF).astype(np.int32)),
            "count": pa.array(np.minimum(counts, np.iinfo(np.int32).max).astype(np.int32)),
        },
        schema=PAIRS,
    )


def _chunk(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _positions(lists: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """For every flattened element: its row, and its place inside the row (0-based)."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    lengths = (
        np.nan_to_num(lengths).astype(np.int64)
        if lengths.dtype.kind == "f"
        else lengths.astype(np.int64)
    )
    row = np.repeat(np.arange(len(lengths)), lengths)
    starts = (
        np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    )
    return row, np.arange(len(row)) - starts[row]


def list_prefix(lists: pa.Array, lengths: np.ndarray) -> pa.Array:
    """The first lengths[i] elements of every list."""
    row, place = _positions(lists)
    values = pc.list_flatten(lists).filter(pa.array(place < lengths[row]))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, type=lists.type)


def list_item(lists: pa.Array, index: np.ndarray) -> pa.Array:
    """Element index[i] of every list."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return pc.take(pc.list_flatten(lists), pa.array(starts + index))


def _prefix_or_null(lists: pa.Array, lengths: np.ndarray) -> pa.Array:
    if lists.null_count == len(lists):
        return pa.nulls(len(lists), lists.type)
    return list_prefix(lists, lengths)


def _item_or_null(lists: pa.Array, index: np.ndarray) -> pa.Array:
    if lists.null_count == len(lists):
        return pa.nulls(len(lists), lists.type.value_type)
    return list_item(lists, index)
