"""Tests-only: a prepared data directory (docs/design.md format) from bundled MovieLens-100K.

Plain pandas, no Ray, so tests that need prepared data do not depend on `p5ray prepare`.
Leave-one-out per user: train = all but the last two items, valid target = second-to-last,
test target = last. Item indices follow a hash of the id (never first appearance).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ML100K = Path(__file__).resolve().parents[1] / "data" / "ml-100k" / "u.data"
INTS = pa.list_(pa.int32())


def prepare_ml100k(out: Path, max_users: int | None = None) -> Path:
    """Write a prepared directory for u.data (optionally only its first `max_users` users)."""
    df = pd.read_csv(ML100K, sep="\t", names=["user", "item", "rating", "ts"], dtype={"user": str, "item": str})
    df["line"] = np.arange(len(df))
    if max_users:
        keep = sorted(df.user.unique(), key=int)[:max_users]
        df = df[df.user.isin(keep)]
    items = sorted(df.item.unique(), key=lambda s: hashlib.sha1(f"0:{s}".encode()).hexdigest())
    item_idx = {s: i + 1 for i, s in enumerate(items)}
    users = sorted(df.user.unique(), key=int)
    user_idx = {s: i + 1 for i, s in enumerate(users)}
    df = df.assign(u=df.user.map(user_idx), i=df.item.map(item_idx)).sort_values(["u", "ts", "line"])
    seqs = df.groupby("u").i.apply(list)
    rates = df.groupby("u").rating.apply(lambda r: [float(x) for x in r])
    out.mkdir(parents=True)
    u = list(seqs.index)
    pq.write_table(pa.table({
        "user_idx": pa.array(u, pa.int32()), "items": pa.array([s[:-2] for s in seqs], INTS),
        "ratings": pa.array([r[:-2] for r in rates], pa.list_(pa.float32())),
    }), out / "train.parquet")
    for name, cut in (("valid", -2), ("test", -1)):
        pq.write_table(pa.table({
            "user_idx": pa.array(u, pa.int32()), "history": pa.array([s[:cut] for s in seqs], INTS),
            "target": pa.array([s[cut] for s in seqs], pa.int32()),
            "target_rating": pa.array([r[cut] for r in rates], pa.float32()),
        }), out / f"{name}.parquet")
    counts = np.zeros(len(items) + 1, np.int64)
    for s in seqs:
        np.add.at(counts, s[:-2], 1)
    pq.write_table(pa.table({
        "item_idx": pa.array(range(1, len(items) + 1), pa.int32()), "item_id": items, "train_count": counts[1:],
    }), out / "items.parquet")
    pq.write_table(pa.table({
        "user_idx": pa.array(range(1, len(users) + 1), pa.int32()), "user_id": users,
        "n_interactions": pa.array([len(seqs[k]) for k in range(1, len(users) + 1)], pa.int32()),
    }), out / "users.parquet")
    pq.write_table(pa.table({
        "user_idx": pa.array(u, pa.int32()), "items": pa.array(list(seqs), INTS),
        "timestamps": pa.array([None] * len(u), pa.list_(pa.int64())),
        "ratings": pa.array(list(rates), pa.list_(pa.float32())),
    }), out / "sequences.parquet")
    n = len(df)
    manifest = {
        "users": len(users), "items": len(items), "interactions": n, "has_ratings": True,
        "rating_min": 1.0, "rating_max": 5.0, "has_timestamps": True, "user_features": {}, "item_features": {},
        "rows_in": n, "rows_kept": n, "rows_quarantined": 0, "rows_dropped": 0,
        "quarantined_by_reason": {}, "dropped_by_reason": {}, "source": str(ML100K), "format": "movielens",
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
