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

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from p5ray import accounting, events, features, formats, outputs, readers, vocab
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
    rating_range: tuple[float, float] | None = None  # None: the format's (MovieLens 0.5..5, ...)
    chunk_bytes: int = 32 << 20  # bytes of text per read task
    rows_per_bucket: int = 1 << 19  # valid events per user bucket in the group-by


def run(opts: PrepareOptions) -> dict:
    """Prepare the data directory at opts.out; returns the manifest. Bad input: UserError/DataError."""
    started = time.time()
    _check_options(opts)
    out = Path(opts.out).resolve()
    outputs.check_out(out, opts.overwrite, [opts.input])
    previous = vocab.load_previous(opts.vocab_from) if opts.vocab_from else None
    columns = {
        "user": opts.user_col,
        "item": opts.item_col,
        "timestamp": opts.time_col,
        "rating": opts.rating_col,
        "event": opts.event_col,
    }
    spec = formats.resolve(opts.input, opts.format, columns, opts.rating_range)
    ranges = readers.plan_ranges(spec, opts.chunk_bytes)
    log.info(
        "reading %s as %s: %d file(s), %d read task(s)",
        opts.input,
        spec.format,
        len(spec.files),
        len(ranges),
    )
    _preflight(spec, ranges, opts)
    with outputs.staging_dir(out, opts.overwrite) as tmp, _ray_session():
        manifest = _prepare(spec, ranges, opts, tmp, previous)
        manifest["elapsed_s"] = round(time.time() - started, 2)
        text = json.dumps(manifest, indent=2, ensure_ascii=False)
        (tmp / "manifest.json").write_text(text + "\n")
    log.info(
        "prepared %s: %d users, %d items, %d interactions in %.1f s",
        out,
        manifest["users"],
        manifest["items"],
        manifest["interactions"],
        manifest["elapsed_s"],
    )
    return manifest


def _check_options(opts: PrepareOptions) -> None:
    if not 0.0 <= opts.max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction must be between 0 and 1, got {opts.max_bad_fraction}")
    if opts.short_users not in SHORT_USER_POLICIES:
        raise UserError(
            f"--short-users must be one of {SHORT_USER_POLICIES}, got {opts.short_users!r}"
        )
    if opts.format not in formats.FORMATS:
        raise UserError(f"--format must be one of {formats.FORMATS}, got {opts.format!r}")


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
            raise ClusterError(
                f"no Ray cluster reachable: {exc}", hint="check RAY_ADDRESS"
            ) from exc
        except Exception as exc:  # ray.init raises bare Exceptions, e.g. a startup timeout
            raise ClusterError(
                f"could not start a local Ray: {exc}",
                hint="retry when the machine is less busy, or start one with `ray start --head` "
                "and set RAY_ADDRESS",
            ) from exc
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


def _map(ds, fn, **fn_kwargs):
    """A Ray Data map of a plain pyarrow-table function over whole blocks."""
    return ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_format="pyarrow", batch_size=None)


def _batches(ds, batch_size=None):
    return ds.iter_batches(batch_format="pyarrow", batch_size=batch_size)


def _prepare(spec: LogSpec, ranges, opts: PrepareOptions, tmp: Path, previous) -> dict:
    """The pipeline (module docstring); writes every file but manifest.json, returns the manifest."""
    clock = _Clock()
    with clock("read"):
        parsed, stats = _read(spec, ranges, opts)
        _write_quarantine(parsed, spec, tmp)
    with clock("group"):
        users, counts = _group_by_user(parsed, spec, opts, stats)
        del parsed  # frees the parsed events in the object store
    with clock("index"):
        user_vocab, item_vocab, seed = _build_vocab(users, opts, previous)
        seq = _map(
            users,
            events.index_user_rows,
            user_vocab=pa.array(user_vocab, pa.string()),
            item_vocab=pa.array(item_vocab, pa.string()),
        ).materialize()
        del users
    with clock("split"):
        sorted_seq = _batches(seq.sort("user_idx"), batch_size=1 << 14)
        split = outputs.write_splits(sorted_seq, tmp, len(user_vocab), len(item_vocab))
    with clock("cross_sell"):
        cross_sell = _cross_sell_events(stats, opts, spec)
        n_pairs = _write_cross_sell(seq, cross_sell, tmp)
    with clock("vocab"):
        feats = _write_id_tables(tmp, spec, opts, (user_vocab, item_vocab), split, previous)
    manifest = {
        "format_version": FORMAT_VERSION,
        **accounting.row_counts(
            stats, counts, split.interactions, split.users_with_rows, split.users_eval
        ),
        **_description(spec, opts, stats, split),
        "users": len(user_vocab),
        "items": len(item_vocab),
        "cross_sell_events": list(cross_sell) if cross_sell else None,
        "cross_sell_pairs": n_pairs,
        **feats,
        "vocab_seed": seed,
        "vocab_from": str(Path(opts.vocab_from).resolve()) if opts.vocab_from else None,
        "new_users": len(user_vocab) - (len(previous.users) if previous else 0),
        "new_items": len(item_vocab) - (len(previous.items) if previous else 0),
        "stage_s": clock.seconds,
        "files": {
            p.relative_to(tmp).as_posix(): outputs.sha256(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        },
    }
    return manifest


class _Clock:
    """Wall seconds per pipeline stage (manifest `stage_s`), each logged as it ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.time()
        yield
        self.seconds[stage] = round(time.time() - start, 2)
        log.info("stage %s: %.1f s", stage, self.seconds[stage])


def _write_quarantine(parsed, spec: LogSpec, tmp: Path) -> None:
    bad = [b.cast(EVENT_SCHEMA) for b in _batches(_map(parsed, _quarantined))]
    rows = pa.concat_tables([EVENT_SCHEMA.empty_table(), *bad])
    outputs.write_quarantine(tmp / "quarantine" / "rows.csv", rows, spec.files)


def _write_cross_sell(seq, cross_sell_events, tmp: Path) -> int:
    """Pair counts per block, sorted by key across blocks, merged while written."""
    partial = _map(seq, events.pair_counts, cross_sell_events=cross_sell_events).materialize()
    batches = _batches(partial.sort("key"), batch_size=1 << 16) if partial.count() else []
    return outputs.write_pairs(batches, tmp / "cross_sell.parquet")


def _read(spec: LogSpec, ranges, opts: PrepareOptions):
    """Read + parse every range (materialized once), count rows by reason, judge the bad fraction."""
    import ray

    source = ray.data.read_datasource(LogRanges(ranges, spec), override_num_blocks=len(ranges))
    parsed = _map(source, parse_lines, spec=spec).materialize()
    stats = accounting.combine(_map(parsed, accounting.summarize_events).take_all())
    accounting.check_rows(stats, spec, opts.max_bad_fraction)
    log.info(
        "read %d rows: %d valid, %d quarantined",
        stats.rows_in,
        stats.valid,
        sum(stats.quarantined.values()),
    )
    return parsed, stats


def _group_by_user(parsed, spec: LogSpec, opts: PrepareOptions, stats):
    """Valid events -> one row per user (time-ordered, de-duplicated), grouped by a user hash bucket."""
    roles = tuple(r for r in ("timestamp", "rating", "event") if r in spec.fields)
    n_buckets = max(1, math.ceil(stats.valid / opts.rows_per_bucket))
    users = (
        _map(parsed, events.valid_events_with_bucket, n_buckets=n_buckets)
        .groupby("bucket", num_partitions=min(n_buckets, 16))
        .map_groups(
            events.order_user_events,
            fn_kwargs={"roles": roles, "drop_short": opts.short_users == "drop"},
            batch_format="pyarrow",
        )
        .materialize()
    )
    rows = _map(users, accounting.summarize_users).take_all()
    counts = {k: int(sum(r[k] for r in rows)) for k in rows[0]} if rows else {}
    if not counts.get("rows_kept"):
        raise UserError(
            f"{spec.files[0]}: no interactions left after dropping {counts.get('users_dropped', 0)} "
            "short users",
            hint="use --short-users train-only",
        )
    return users, counts


class LogRanges(Datasource):
    """A Ray Data datasource: one read task per planned byte range (readers.plan_ranges)."""

    def __init__(self, ranges: list[readers.ByteRange], spec: LogSpec):
        super().__init__()
        self.ranges, self.spec = ranges, spec

    def get_read_tasks(
        self, parallelism, per_task_row_limit=None, data_context=None
    ) -> list[ReadTask]:
        spec = self.spec
        return [
            ReadTask(
                lambda r=r: readers.read_range(r, spec),
                BlockMetadata(
                    num_rows=None, size_bytes=_range_bytes(r), exec_stats=None, input_files=[r.path]
                ),
            )
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
    if (
        any(r.kind != "text" for r in ranges)
        or sum(_range_bytes(r) for r in ranges) > PREFLIGHT_BYTES
    ):
        return
    parsed = [parse_lines(t, spec) for r in ranges for t in readers.read_range(r, spec)]
    stats = accounting.combine([accounting.summarize_events(p).to_pylist()[0] for p in parsed])
    accounting.check_rows(stats, spec, opts.max_bad_fraction)


def _quarantined(parsed: pa.Table) -> pa.Table:
    return parsed.filter(pc.is_in(parsed["reason"], value_set=pa.array(list(REASONS), pa.string())))


def _build_vocab(users, opts: PrepareOptions, previous) -> tuple[list[str], list[str], int]:
    seed = (
        opts.vocab_seed
        if opts.vocab_seed is not None
        else (previous.seed if previous else vocab.DEFAULT_SEED)
    )
    ids = {"user": set(), "item": set()}
    for batch in users.map_batches(
        accounting.vocab_ids, batch_format="pyarrow", batch_size=None
    ).iter_batches(batch_format="pyarrow", batch_size=None):
        for kind in ids:
            ids[kind].update(batch.filter(pc.equal(batch["kind"], kind))["id"].to_pylist())
    user_vocab = vocab.assign(ids["user"], seed, previous.users if previous else None)
    item_vocab = vocab.assign(ids["item"], seed, previous.items if previous else None)
    return user_vocab, item_vocab, seed


def _cross_sell_events(stats, opts: PrepareOptions, spec: LogSpec) -> tuple[str, ...] | None:
    """The event types whose pairs feed cross-sell; None: every event (no event column, or none
    of the configured types occurs)."""
    if "event" not in spec.fields:
        return None
    wanted = tuple(e.lower() for e in opts.cross_sell_events)
    if any(e in stats.event_types for e in wanted):
        return wanted
    log.warning("no %s events in the log; cross-sell pairs come from all events", "/".join(wanted))
    return None


def _write_id_tables(tmp: Path, spec, opts, vocabs, split: outputs.SplitCounts, previous) -> dict:
    """users.parquet and items.parquet with their feature columns; returns the manifest entries."""
    paths = features.side_files(spec, opts.user_features, opts.item_features)
    out = {"user_features": {}, "item_features": {}, "feature_rows_skipped": 0}
    count_cols = (
        ("n_interactions", split.n_interactions[1:], pa.int32()),
        ("train_count", split.train_count[1:], pa.int64()),
    )
    for kind, ids, path, count, id_col in zip(
        ("user", "item"), vocabs, paths, count_cols, (opts.user_col, opts.item_col), strict=True
    ):
        feature_cols = {}
        if path is not None:
            table = features.read_table(Path(path), kind, id_col)
            old = previous.features.get(kind) if previous else None
            feature_cols, out[f"{kind}_features"] = features.encode(table, ids, old)
            out["feature_rows_skipped"] += table.skipped_rows
            log.info(
                "%s features from %s: %s", kind, path, ", ".join(out[f"{kind}_features"]) or "none"
            )
        outputs.write_id_table(tmp / f"{kind}s.parquet", kind, ids, count, feature_cols)
    return out


def _description(spec: LogSpec, opts: PrepareOptions, stats, split: outputs.SplitCounts) -> dict:
    return {
        "source": [str(Path(f).resolve()) for f in spec.files],
        "format": spec.format,
        "format_note": spec.note,
        "short_users": opts.short_users,
        "has_ratings": "rating" in spec.fields,
        "rating_min": split.rating_min,
        "rating_max": split.rating_max,
        "has_timestamps": "timestamp" in spec.fields,
        "has_events": "event" in spec.fields,
        "event_types": dict(sorted(stats.event_types.items())),
    }
