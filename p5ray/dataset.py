"""Reading a prepared data directory (the format is in docs/design.md) and making training batches.

Everything here is plain numpy / pyarrow / torch on in-memory arrays, testable without Ray;
`train.py` feeds it the rows of its Ray Data shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from p5ray.errors import DataError
from p5ray.model import FeatureSpec

REQUIRED = ("manifest.json", "users.parquet", "items.parquet", "train.parquet", "valid.parquet", "test.parquet")


def check_data_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(str(path), "data directory does not exist", hint="run `p5ray prepare --out DIR` first")
    missing = [f for f in REQUIRED if not (path / f).exists()]
    if missing:
        raise DataError(
            str(path),
            f"not a prepared data directory (missing {', '.join(missing)})",
            hint="point --data at the --out directory of `p5ray prepare`",
        )
    return path


def read_manifest(path: str | Path) -> dict:
    path = check_data_dir(path)
    try:
        return json.loads((path / "manifest.json").read_text())
    except json.JSONDecodeError as exc:
        raise DataError(str(path / "manifest.json"), f"not valid JSON ({exc})") from None


def read_table(path: str | Path, name: str):
    return pq.read_table(Path(path) / name)


def feature_specs(manifest: dict, key: str) -> tuple[FeatureSpec, ...]:
    specs = manifest.get(key) or {}
    return tuple(
        FeatureSpec(name, spec["kind"], int(spec["cardinality"])) for name, spec in sorted(specs.items())
    )


def feature_values(table, specs: tuple[FeatureSpec, ...], index_col: str) -> dict[str, torch.Tensor]:
    """Feature columns of users.parquet / items.parquet as tensors indexed by entity index."""
    index = table.column(index_col).to_numpy()
    rows = int(index.max()) + 1 if len(index) else 1
    out = {}
    for spec in specs:
        column = table.column(f"feat_{spec.name}").to_pylist()
        if spec.kind == "categorical":
            values = np.zeros(rows, dtype=np.int64)
            values[index] = np.asarray(column, dtype=np.int64)
        else:
            width = max((len(v or []) for v in column), default=1) or 1
            values = np.zeros((rows, width), dtype=np.int64)
            for i, v in zip(index, column, strict=True):
                if v:
                    values[i, : len(v)] = v
        out[spec.name] = torch.from_numpy(values)
    return out


# -- training examples ----------------------------------------------------------------------


def windows(items: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    """(start, end) slices covering a training sequence in windows of max_len + 1 items.

    The last window ends at the sequence end; earlier windows step back by max_len so every
    (input, next item) pair is trained on exactly once. Sequences of < 2 items give nothing.
    """
    n = len(items)
    out = []
    end = n
    while end >= 2:
        start = max(0, end - max_len - 1)
        out.append((start, end))
        if start == 0:
            break
        end = start + 1
    return out


def explode_windows(batch: dict[str, np.ndarray], max_len: int) -> dict[str, np.ndarray]:
    """Ray Data batch transform: one row per user -> one row per training window."""
    users, items, ratings, weights = [], [], [], []
    has_ratings = "ratings" in batch and batch["ratings"] is not None
    for i, seq in enumerate(batch["items"]):
        seq = np.asarray(seq, dtype=np.int32)
        rat = np.asarray(batch["ratings"][i], dtype=np.float32) if has_ratings and batch["ratings"][i] is not None else None
        w = float(batch["weight"][i]) if "weight" in batch else 1.0
        for start, end in windows(seq, max_len):
            users.append(batch["user_idx"][i])
            items.append(seq[start:end])
            ratings.append(rat[start:end] if rat is not None else np.full(end - start, np.nan, np.float32))
            weights.append(w)
    return {
        "user_idx": np.asarray(users, dtype=np.int32),
        "items": _object_array(items),
        "ratings": _object_array(ratings),
        "weight": np.asarray(weights, dtype=np.float32),
    }


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def bucketed_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 64) -> np.ndarray:
    """A shuffled order of rows whose consecutive batches hold rows of similar length.

    Rows are shuffled, cut into pools of `pool` batches, sorted by length inside each pool, cut
    into batches and the batches shuffled. Each batch is padded only to its own longest row, so
    short-sequence data (Amazon Beauty: ~7 items a user) skips most of the padding compute while
    batches still mix users at random.
    """
    order = rng.permutation(len(lengths))
    span = batch_size * max(1, pool)
    chunks = []
    for start in range(0, len(order), span):
        part = order[start:start + span]
        chunks.append(part[np.argsort(lengths[part], kind="stable")])
    order = np.concatenate(chunks) if chunks else order
    full = len(order) // batch_size
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(full)]
    rest = order[full * batch_size:]  # the short batch goes last, where a step count drops it
    return np.concatenate([batches[i] for i in rng.permutation(full)] + [rest])


@dataclass
class NegativeSampler:
    """Uniform items the user never touched (rejection sampling; never a positive)."""

    num_items: int
    rng: np.random.Generator

    def sample(self, positives: set[int], shape: tuple[int, ...]) -> np.ndarray:
        out = self.rng.integers(1, self.num_items + 1, size=shape)
        if not positives or len(positives) >= self.num_items:
            return out
        flat = out.reshape(-1)
        bad = np.fromiter((x in positives for x in flat), bool, count=flat.size)
        while bad.any():
            flat[bad] = self.rng.integers(1, self.num_items + 1, size=int(bad.sum()))
            bad[bad] = np.fromiter((x in positives for x in flat[bad]), bool, count=int(bad.sum()))
        return out


def collate(
    rows: dict[str, np.ndarray],
    max_len: int,
    sampler: NegativeSampler,
    rank_negatives: int,
    user_items: dict[int, set[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Training windows -> the batch dict of losses.MultiTaskLoss.

    Left-padded to the longest window in the batch (at most max_len): short-sequence data sets
    such as Amazon Beauty then cost a fraction of a full max_len batch.
    """
    n = len(rows["items"])
    max_len = max(1, min(max_len, max((len(s) - 1 for s in rows["items"]), default=1)))
    inputs = np.zeros((n, max_len), dtype=np.int64)
    targets = np.zeros((n, max_len), dtype=np.int64)
    ratings = np.full((n, max_len), np.nan, dtype=np.float32)
    negatives = np.zeros((n, max_len, max(rank_negatives, 1)), dtype=np.int64)
    seen_lists = []
    for i in range(n):
        seq = np.asarray(rows["items"][i], dtype=np.int64)[-(max_len + 1):]
        m = len(seq) - 1
        if m <= 0:
            seen_lists.append(seq)
            continue
        inputs[i, max_len - m:] = seq[:-1]
        targets[i, max_len - m:] = seq[1:]
        ratings[i, max_len - m:] = np.asarray(rows["ratings"][i], dtype=np.float32)[-(max_len + 1):][1:]
        user = int(rows["user_idx"][i])
        positives = user_items.get(user) if user_items else None
        positives = positives if positives is not None else set(seq.tolist())
        negatives[i, max_len - m:] = sampler.sample(positives, (m, negatives.shape[-1]))
        seen_lists.append(np.fromiter(positives, np.int64) if user_items else seq)
    width = max(1, max(len(s) for s in seen_lists))
    seen = np.zeros((n, width), dtype=np.int64)
    for i, s in enumerate(seen_lists):
        seen[i, : len(s)] = s
    return {
        "inputs": torch.from_numpy(inputs),
        "targets": torch.from_numpy(targets),
        "ratings": torch.from_numpy(ratings),
        "users": torch.from_numpy(np.asarray(rows["user_idx"], dtype=np.int64)),
        "weights": torch.from_numpy(np.asarray(rows.get("weight", np.ones(n)), dtype=np.float32)),
        "rank_negatives": torch.from_numpy(negatives),
        "seen": torch.from_numpy(seen),
    }


def left_pad(sequences: list, max_len: int) -> torch.Tensor:
    """Histories -> (B, max_len) long, most recent item last, 0-padded on the left."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for i, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64)[-max_len:]
        if len(seq):
            out[i, max_len - len(seq):] = seq
    return torch.from_numpy(out)
