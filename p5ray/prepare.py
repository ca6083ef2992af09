"""`p5ray prepare`: raw interaction log -> prepared data directory (format: docs/design.md).

The Ray Data pipeline, one line per step (each step a plain function of another module):

    read ranges (readers.read_range) -> parse + validate (parsers.parse_lines)      [materialized]
      -> row accounting, bad-fraction verdict (accounting)          -> quarantine/rows.csv
      -> valid events, grouped by a hash bucket of the user (events.order_user_events):
         time order, ties by file order, duplicates out, short-user policy          [materialized]
      -> vocab (vocab.assign: keyed hash order, or kept from --vocab-from)
      -> ids -> indices (events.index_user_rows)                                     [materialized]
      -> sort by user_idx -> sequences / train / valid / test / users / items Parquet
      -> consecutive training pairs (events.pair_counts) -> sort -> cross_sell.parquet

The driver holds per-user and per-item state only (the vocab, counters), never the log.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from p5ray import accounting, events, features, outputs, readers, vocab
from p5ray.errors import ClusterError, UserError
from p5ray.parsers import EVENT_SCHEMA, REASONS, LogSpec, parse_lines

log = logging.getLogger("p5ray.prepare")

FORMAT_VERSION = 1
SHORT_USER_POLICIES = ("train-only", "drop")
PREFLIGHT_BYTES = 1 << 20


@dataclass(frozen=True)
class PrepareOptions:
    input: str
    out: str
    format: str = "auto"
    user_features: str | None = None
    item_features: str | None = None
    overwrite: bool = False
    max_bad_fraction: float = 0.01
    vocab_from: str | None = None
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    rating_col: str | None = None
    event_col: str | None = None
    short_users: str = "train-only"
    vocab_seed: int | None = None  # None: the --vocab-from seed, else vocab.DEFAULT_SEED
    cross_sell_events: tuple[str, ...] = ("purchase",)  # event types that form cross-sell pairs
    rating_range: tuple[float, float] | None = None  # None: the format's (MovieLens 0.5..5, Amazon 1..5)
    chunk_bytes: int = 32 << 20  # bytes of text per read task
    rows_per_bucket: int = 1 << 19  # valid events per user bucket in the group-by


def run(opts: PrepareOptions) -> dict:
    """Prepare the data directory at opts.out; returns the manifest. Bad input: UserError/DataError."""
    started = time.time()
    _check_options(opts)
    out = Path(opts.out).resolve()
    outputs.check_out(out, opts.overwrite, [opts.input])
    previous = vocab.load_previous(opts.vocab_from) if opts.vocab_from else None
    columns = {"user": opts.user_col, "item": opts.item_col, "timestamp": opts.time_col,
               "rating": opts.rating_col, "event": opts.event_col}
    spec = readers.resolve(opts.input, opts.format, columns, opts.rating_range)
    ranges = readers.plan_ranges(spec, opts.chunk_bytes)
    log.info("reading %s as %s: %d file(s), %d read task(s)", opts.input, spec.format, len(spec.files), len(ranges))
    _preflight(spec, ranges, opts)
    with outputs.staging_dir(out, opts.overwrite) as tmp, _ray_session():
        manifest = _prepare(spec, ranges, opts, tmp, previous)
        manifest["elapsed_s"] = round(time.time() - started, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    log.info("prepared %s: %d users, %d items, %d interactions in %.1f s", out, manifest["users"],
             manifest["items"], manifest["interactions"], manifest["elapsed_s"])
    return manifest


def _check_options(opts: PrepareOptions) -> None:
    if not 0.0 <= opts.max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction must be between 0 and 1, got {opts.max_bad_fraction}")
    if opts.short_users not in SHORT_USER_POLICIES:
        raise UserError(f"--short-users must be one of {SHORT_USER_POLICIES}, got {opts.short_users!r}")
    if opts.format not in readers.FORMATS:
        raise UserError(f"--format must be one of {readers.FORMATS}, got {opts.format!r}")


@contextmanager
def _ray_session():
    """Use the Ray already initialised (tests, `submit`), or start a local one for this run."""
    import ray
    from ray.data import DataContext

    started = False
    if not ray.is_initialized():
        try:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ClusterError(f"no Ray cluster reachable: {exc}", hint="check RAY_ADDRESS") from exc
        started = True
    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()


def _prepare(spec, ranges, opts: PrepareOptions, tmp: Path, previous) -> dict:
    import ray

    parsed = (
        ray.data.read_datasource(LogRanges(ranges, spec), override_num_blocks=len(ranges))
        .map_batches(parse_lines, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None)
        .materialize()
    )
    stats = accounting.combine(parsed.map_batches(accounting.summarize_events, batch_format="pyarrow", batch_size=None).take_all())
    accounting.check_rows(stats, spec, opts.max_bad_fraction)
    bad = [b for b in parsed.map_batches(_quarantined, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="pyarrow", batch_size=None)]
    outputs.write_quarantine(tmp / "quarantine" / "rows.csv", _concat(bad, EVENT_SCHEMA), spec.files)

    roles = tuple(r for r in ("timestamp", "rating", "event") if r in spec.fields)
    n_buckets = max(1, math.ceil(stats.valid / opts.rows_per_bucket))
    users = (
        parsed.map_batches(events.valid_events_with_bucket, fn_kwargs={"n_buckets": n_buckets}, batch_format="pyarrow", batch_size=None)
        .groupby("bucket", num_partitions=min(n_buckets, 16))
        .map_groups(events.order_user_events, fn_kwargs={"roles": roles, "drop_short": opts.short_users == "drop"}, batch_format="pyarrow")
        .materialize()
    )
    counts = _sum_rows(users.map_batches(accounting.summarize_users, batch_format="pyarrow", batch_size=None).take_all())
    if counts["rows_kept"] == 0:
        raise UserError(f"{spec.files[0]}: no interactions left after dropping {counts['users_dropped']} short users",
                        hint="use --short-users train-only")
    user_vocab, item_vocab, seed = _build_vocab(users, opts, previous)
    seq = users.map_batches(events.index_user_rows, fn_kwargs={"user_vocab": pa.array(user_vocab, pa.string()),
                            "item_vocab": pa.array(item_vocab, pa.string())}, batch_format="pyarrow", batch_size=None).materialize()
    written = _write_splits(seq, tmp, len(user_vocab), len(item_vocab))
    cross_sell = _cross_sell_events(stats, opts, roles)
    written["cross_sell_pairs"] = _write_cross_sell(seq, tmp, cross_sell)
    written["cross_sell_events"] = list(cross_sell) if cross_sell else None
    feats = _write_vocab(tmp, spec, opts, user_vocab, item_vocab, written, previous)
    return _manifest(spec, opts, stats, counts, written, feats, seed, previous, user_vocab, item_vocab, tmp)


class LogRanges(Datasource):
    """A Ray Data datasource: one read task per planned byte range (readers.plan_ranges)."""

    def __init__(self, ranges: list[readers.ByteRange], spec: LogSpec):
        super().__init__()
        self.ranges, self.spec = ranges, spec

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        spec = self.spec
        return [
            ReadTask(lambda r=r: readers.read_range(r, spec),
                     BlockMetadata(num_rows=None, size_bytes=_range_bytes(r), exec_stats=None, input_files=[r.path]))
            for r in self.ranges
        ]

    def estimate_inmemory_data_size(self) -> int:
        return sum(_range_bytes(r) for r in self.ranges)

    def get_name(self) -> str:
        return "InteractionLog"


def _range_bytes(r: readers.ByteRange) -> int:
    return (r.end - r.start) if r.end is not None else Path(r.path).stat().st_size


def _preflight(spec: LogSpec, ranges: list[readers.ByteRange], opts: PrepareOptions) -> None:
    """A small text log is checked here, before Ray starts, so bad input fails in a second."""
    if any(r.kind != "text" for r in ranges) or sum(_range_bytes(r) for r in ranges) > PREFLIGHT_BYTES:
        return
    parsed = [parse_lines(t, spec) for r in ranges for t in readers.read_range(r, spec)]
    stats = accounting.combine([accounting.summarize_events(p).to_pylist()[0] for p in parsed])
    accounting.check_rows(stats, spec, opts.max_bad_fraction)


def _quarantined(parsed: pa.Table) -> pa.Table:
    return parsed.filter(pc.is_in(parsed["reason"], value_set=pa.array(list(REASONS), pa.string())))


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def _sum_rows(rows: list[dict]) -> dict:
    keys = ("users_kept", "rows_kept", "users_dropped", "rows_dropped_short", "duplicates", "users_eval")
    return {k: int(sum(r[k] for r in rows)) for k in keys}


def _build_vocab(users, opts: PrepareOptions, previous) -> tuple[list[str], list[str], int]:
    seed = opts.vocab_seed if opts.vocab_seed is not None else (previous.seed if previous else vocab.DEFAULT_SEED)
    ids = {"user": set(), "item": set()}
    for batch in users.map_batches(accounting.vocab_ids, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="pyarrow", batch_size=None):
        for kind in ids:
            ids[kind].update(batch.filter(pc.equal(batch["kind"], kind))["id"].to_pylist())
    user_vocab = vocab.assign(ids["user"], seed, previous.users if previous else None)
    item_vocab = vocab.assign(ids["item"], seed, previous.items if previous else None)
    return user_vocab, item_vocab, seed


def _write_splits(seq, tmp: Path, n_users: int, n_items: int) -> dict:
    """Sequences and leave-one-out splits in user_idx order; per-user/per-item counts on the way."""
    n_interactions = np.zeros(n_users + 1, np.int64)
    train_count = np.zeros(n_items + 1, np.int64)
    rating_lo, rating_hi, last = math.inf, -math.inf, 0
    sinks = {name: outputs.ParquetSink(tmp / f"{name}.parquet", schema) for name, schema in
             (("sequences", events.SEQUENCES), ("train", events.TRAIN), ("valid", events.HELDOUT), ("test", events.HELDOUT))}
    for batch in seq.sort("user_idx").iter_batches(batch_format="pyarrow", batch_size=1 << 14):
        idx = batch["user_idx"].to_numpy()
        if idx[0] <= last or np.any(np.diff(idx) <= 0):
            raise RuntimeError("sequences arrive out of user_idx order")
        last = int(idx[-1])
        items = batch["items"].combine_chunks()
        n_interactions[idx] = pc.list_value_length(items).to_numpy()
        ratings = pc.list_flatten(batch["ratings"].combine_chunks())
        if len(ratings):
            lo, hi = pc.min_max(ratings).values()
            rating_lo, rating_hi = min(rating_lo, lo.as_py()), max(rating_hi, hi.as_py())
        train, valid, test = events.split_leave_one_out(batch)
        train_count += np.bincount(pc.list_flatten(train["items"]).to_numpy(), minlength=n_items + 1)
        for name, table in (("sequences", batch), ("train", train), ("valid", valid), ("test", test)):
            sinks[name].write(table)
    for sink in sinks.values():
        sink.close()
    return {"n_interactions": n_interactions, "train_count": train_count, "users_eval": sinks["valid"].rows,
            "users_with_rows": sinks["sequences"].rows, "interactions": int(n_interactions.sum()),
            "rating_min": None if rating_lo == math.inf else float(rating_lo),
            "rating_max": None if rating_hi == -math.inf else float(rating_hi)}


def _cross_sell_events(stats, opts: PrepareOptions, roles) -> tuple[str, ...] | None:
    if "event" not in roles:
        return None
    wanted = tuple(e.lower() for e in opts.cross_sell_events)
    if any(e in stats.event_types for e in wanted):
        return wanted
    log.warning("no %s events in the log; cross-sell pairs come from all events", "/".join(wanted))
    return None


def _write_cross_sell(seq, tmp: Path, cross_sell_events) -> int:
    partial = seq.map_batches(events.pair_counts, fn_kwargs={"cross_sell_events": cross_sell_events},
                              batch_format="pyarrow", batch_size=None).materialize()
    with outputs.ParquetSink(tmp / "cross_sell.parquet", events.PAIRS) as sink:
        if partial.count():
            batches = partial.sort("key").iter_batches(batch_format="pyarrow", batch_size=1 << 16)
            for table in events.merge_sorted_counts(batches):
                sink.write(table)
    return sink.rows


def _write_vocab(tmp, spec, opts, user_vocab, item_vocab, written, previous) -> dict:
    user_path, item_path = _feature_paths(spec, opts)
    out = {"user_features": {}, "item_features": {}, "feature_rows_skipped": 0}
    for kind, ids, path, counts in (("user", user_vocab, user_path, ("n_interactions", pa.int32())),
                                    ("item", item_vocab, item_path, ("train_count", pa.int64()))):
        cols = {f"{kind}_idx": pa.array(np.arange(1, len(ids) + 1), pa.int32()), f"{kind}_id": pa.array(ids, pa.string()),
                counts[0]: pa.array(written[counts[0]][1:], counts[1])}
        if path is not None:
            table = features.read_table(Path(path), kind, opts.user_col if kind == "user" else opts.item_col)
            feature_cols, entries = features.encode(table, ids, previous.features.get(kind) if previous else None)
            cols.update(feature_cols)
            out[f"{kind}_features"] = entries
            out["feature_rows_skipped"] += table.skipped_rows
            log.info("%s features from %s: %s", kind, path, ", ".join(entries) or "none")
        outputs.write_table(tmp / f"{kind}s.parquet", pa.table(cols))
    return out


def _feature_paths(spec, opts: PrepareOptions):
    user_path, item_path = opts.user_features, opts.item_features
    if spec.format == "movielens" and len(spec.files) == 1:
        found_user, found_item = features.movielens_side_files(spec.files[0])
        user_path, item_path = user_path or found_user, item_path or found_item
    return user_path, item_path


def _manifest(spec, opts, stats, counts, written, feats, seed, previous, user_vocab, item_vocab, tmp) -> dict:
    quarantined = stats.quarantined
    dropped = {"blank_line": stats.blank, "duplicate": counts["duplicates"], "short_user": counts["rows_dropped_short"]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": [str(Path(f).resolve()) for f in spec.files],
        "format": spec.format,
        "format_note": spec.note,
        "rows_in": stats.rows_in,
        "rows_kept": written["interactions"],
        "rows_quarantined": sum(quarantined.values()),
        "rows_dropped": sum(dropped.values()),
        "quarantined_by_reason": quarantined,
        "dropped_by_reason": dropped,
        "users": len(user_vocab),
        "items": len(item_vocab),
        "interactions": written["interactions"],
        "users_eval": written["users_eval"],
        "users_train_only": written["users_with_rows"] - written["users_eval"],
        "users_dropped": counts["users_dropped"],
        "short_users": opts.short_users,
        "has_ratings": "rating" in spec.fields,
        "rating_min": written["rating_min"],
        "rating_max": written["rating_max"],
        "has_timestamps": "timestamp" in spec.fields,
        "has_events": "event" in spec.fields,
        "event_types": dict(sorted(stats.event_types.items())),
        "cross_sell_events": written["cross_sell_events"],
        "cross_sell_pairs": written["cross_sell_pairs"],
        **feats,
        "vocab_seed": seed,
        "vocab_from": str(Path(opts.vocab_from).resolve()) if opts.vocab_from else None,
        "new_users": len(user_vocab) - (len(previous.users) if previous else 0),
        "new_items": len(item_vocab) - (len(previous.items) if previous else 0),
        "files": {p.relative_to(tmp).as_posix(): outputs.sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
    }
    if counts["rows_kept"] != written["interactions"] or manifest["rows_in"] != (
        manifest["rows_kept"] + manifest["rows_quarantined"] + manifest["rows_dropped"]
    ):
        raise RuntimeError(f"row accounting does not add up: {manifest}")
    return manifest
