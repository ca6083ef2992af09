"""Every input row accounted for: counts by reason, the first bad row, the bad-fraction verdict.

`summarize_events` (a Ray Data map on parsed events) and `summarize_users` (a map on per-user
rows) each reduce a batch to one small row; `combine` adds the rows up in the driver, and
`check_rows` turns the totals into a verdict: a DataError naming the file, the first bad line
and the reason, or nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p5ray.errors import DataError
from p5ray.parsers import DROP_REASONS, REASONS, LogSpec

MAX_EVENT_TYPES = 1000


@dataclass
class RowStats:
    rows_in: int = 0
    by_reason: Counter = field(default_factory=Counter)  # quarantine and drop reasons of parsing
    first_bad: tuple | None = None  # (file, line, pos, reason, raw) of the first quarantined row
    event_types: Counter = field(default_factory=Counter)  # valid rows per event type

    @property
    def quarantined(self) -> dict[str, int]:
        return {r: n for r, n in sorted(self.by_reason.items()) if r in REASONS and n}

    @property
    def blank(self) -> int:
        return sum(n for r, n in self.by_reason.items() if r in DROP_REASONS)

    @property
    def valid(self) -> int:
        return self.rows_in - sum(self.by_reason.values())


def summarize_events(events: pa.Table) -> pa.Table:
    """Parsed events -> one row: rows, counts by reason, the first bad row, event type counts."""
    reasons = events["reason"]
    counts = (
        {}
        if reasons.null_count == len(reasons)
        else {
            d["values"]: d["counts"]
            for d in pc.value_counts(reasons).to_pylist()
            if d["values"] is not None
        }
    )
    bad = events.filter(pc.is_in(reasons, value_set=pa.array(list(REASONS), pa.string())))
    first = None
    if bad.num_rows:
        key = np.lexsort((bad["pos"].to_numpy(), bad["line"].to_numpy(), bad["file"].to_numpy()))[0]
        row = bad.slice(int(key), 1).to_pylist()[0]
        first = [row["file"], row["line"], row["pos"], row["reason"], row["raw"]]
    valid_events = events.filter(pc.is_null(reasons))["event"]
    types = (
        {}
        if valid_events.null_count == len(valid_events)
        else {
            d["values"]: d["counts"]
            for d in pc.value_counts(valid_events).to_pylist()
            if d["values"] is not None
        }
    )
    return pa.table(
        {
            "summary": [
                json.dumps(
                    {"rows": events.num_rows, "reasons": counts, "first": first, "events": types}
                )
            ]
        }
    )


def combine(summaries: list[dict]) -> RowStats:
    stats = RowStats()
    for item in summaries:
        s = json.loads(item["summary"])
        stats.rows_in += s["rows"]
        stats.by_reason.update(s["reasons"])
        if s["first"] is not None and (
            stats.first_bad is None or tuple(s["first"][:3]) < stats.first_bad[:3]
        ):
            stats.first_bad = tuple(s["first"])
        stats.event_types.update(s["events"])
    if len(stats.event_types) > MAX_EVENT_TYPES:
        stats.event_types = Counter(dict(stats.event_types.most_common(MAX_EVENT_TYPES)))
    return stats


def check_rows(stats: RowStats, spec: LogSpec, max_bad_fraction: float) -> None:
    """Raise DataError when the log is unusable: no rows, nothing valid, or too many bad rows."""
    first_file = spec.files[0] if spec.files else "input"
    if stats.rows_in - stats.blank == 0:
        what = "header only" if spec.header else "only blank lines"
        raise DataError(
            first_file,
            f"no data rows ({what})",
            line=2 if spec.header else None,
            hint="the log needs at least one interaction",
        )
    bad = sum(stats.quarantined.values())
    if bad == 0:
        return
    file, line, _pos, reason, raw = stats.first_bad
    where = spec.files[file]
    detail = f"first bad row: {describe(reason, spec)}: {_excerpt(raw)}"
    if stats.valid == 0:
        raise DataError(
            where, f"no row could be read; {detail}", line=line, hint=_hint(reason, raw, spec)
        )
    if bad / stats.rows_in > max_bad_fraction:
        raise DataError(
            where,
            f"{bad} of {stats.rows_in} rows are bad ({bad / stats.rows_in:.2%}, more than "
            f"--max-bad-fraction {max_bad_fraction:g}); {detail}",
            line=line,
            hint=_hint(reason, raw, spec)
            or "see the reasons in the message; raise --max-bad-fraction to accept them",
        )


def describe(reason: str, spec: LogSpec) -> str:
    text = REASONS.get(reason, DROP_REASONS.get(reason, reason))
    if reason == "wrong_field_count" and spec.delimiter:
        text += f" (expected {spec.n_fields} separated by {_name(spec.delimiter)})"
    if reason == "rating_out_of_range" and spec.rating_range:
        text += f" (expected {spec.rating_range[0]:g}..{spec.rating_range[1]:g})"
    return f"{text} [{reason}]"


def _name(delimiter: str) -> str:
    return {"\t": "tabs", ",": "commas", "::": "'::'"}.get(delimiter, repr(delimiter))


def _hint(reason: str, raw: str | None, spec: LogSpec) -> str | None:
    if reason != "wrong_field_count" or not raw or not spec.delimiter:
        return None
    if spec.delimiter == "," and "\t" in raw:
        return "the rows look tab-separated; try --format tsv"
    if spec.delimiter == "\t" and "," in raw:
        return "the rows look comma-separated; try --format csv"
    return None


def _excerpt(raw: str | None, limit: int = 80) -> str:
    text = (raw or "").encode("unicode_escape").decode("ascii")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def summarize_users(rows: pa.Table) -> pa.Table:
    """Per-user rows -> one row of counts: kept/dropped users and rows, duplicates, eval users."""
    n = pc.list_value_length(rows["items"]).to_numpy(zero_copy_only=False).astype(np.int64)
    dropped = rows["dropped"].to_numpy(zero_copy_only=False)
    kept = n[~dropped]
    return pa.table(
        {
            "users_kept": [int((~dropped).sum())],
            "rows_kept": [int(kept.sum())],
            "users_dropped": [int(dropped.sum())],
            "rows_dropped_short": [int(n[dropped].sum())],
            "duplicates": [int(pc.sum(rows["n_duplicates"]).as_py() or 0)],
            "users_eval": [int((kept >= 3).sum())],
        }
    )


def vocab_ids(rows: pa.Table) -> pa.Table:
    """Per-user rows -> the distinct user and item ids of kept users (`kind`, `id`)."""
    rows = rows.filter(pc.invert(rows["dropped"]))
    users = pc.unique(rows["user_id"].combine_chunks())
    items = pc.unique(pc.list_flatten(rows["items"].combine_chunks()))
    return pa.table(
        {
            "kind": pa.array(["user"] * len(users) + ["item"] * len(items), pa.string()),
            "id": pa.concat_arrays([users, items]),
        }
    )


def row_counts(
    stats: RowStats, users: dict, kept: int, users_with_rows: int, users_eval: int
) -> dict:
    """The manifest's accounting; rows_in = rows_kept + rows_quarantined + rows_dropped, exactly.

    `users`: summed `summarize_users` rows; `kept`: interactions written to sequences.parquet.
    """
    quarantined = stats.quarantined
    dropped = {
        "blank_line": stats.blank,
        "duplicate": users["duplicates"],
        "short_user": users["rows_dropped_short"],
    }
    out = {
        "rows_in": stats.rows_in,
        "rows_kept": kept,
        "rows_quarantined": sum(quarantined.values()),
        "rows_dropped": sum(dropped.values()),
        "quarantined_by_reason": quarantined,
        "dropped_by_reason": dropped,
        "interactions": kept,
        "users_eval": users_eval,
        "users_train_only": users_with_rows - users_eval,
        "users_dropped": users["users_dropped"],
    }
    if users["rows_kept"] != kept or out["rows_in"] != (
        out["rows_kept"] + out["rows_quarantined"] + out["rows_dropped"]
    ):
        raise RuntimeError(f"row accounting does not add up: {out}, {users}")
    return out
