"""User and item feature tables -> `feat_<name>` columns aligned with the vocab.

MovieLens side files are found beside the log (`u.user`/`u.item` beside `u.data`, `users.dat`/
`movies.dat` beside `ratings.dat`, `movies.csv` beside `ratings.csv`) and turned into:
users: age (bucketed as in ML-1M), gender, occupation, zip (first character);
items: genres (multi-valued), year (release decade). Any other table (`--user-features`,
`--item-features`: csv, tsv, parquet, jsonl) gives one categorical feature per column (a list
column: multi-valued; a numeric column with more than 20 values: deciles).

A feature's values are numbered 1..K (0 = unknown/missing) in a fixed order (MovieLens' own
order where there is one, else sorted), after the values an earlier vocab already numbered.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from p5ray.errors import DataError
from p5ray.readers import decode

AGE_BUCKETS = ["under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
_AGE_EDGES = [18, 25, 35, 45, 50, 56]
GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
MOVIELENS_SIDE_FILES = {
    "u.data": ("u.user", "u.item"),
    "ratings.dat": ("users.dat", "movies.dat"),
    "ratings.csv": (None, "movies.csv"),
}
MULTI = "multi_categorical"


@dataclass
class FeatureTable:
    """Raw feature values per id: values[feature][id] is a string or a list of strings."""

    values: dict[str, dict[str, object]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    order: dict[str, list[str]] = field(default_factory=dict)
    skipped_rows: int = 0


def movielens_side_files(log_path: str) -> tuple[Path | None, Path | None]:
    path = Path(log_path)
    names = MOVIELENS_SIDE_FILES.get(path.name.removesuffix(".gz"), (None, None))
    found = [path.parent / n if n and (path.parent / n).is_file() else None for n in names]
    return found[0], found[1]


def side_files(spec, user_path: str | None, item_path: str | None) -> tuple:
    """The feature tables to read: the given ones, else MovieLens' own beside a MovieLens log."""
    if spec.format == "movielens" and len(spec.files) == 1:
        found_user, found_item = movielens_side_files(spec.files[0])
        return user_path or found_user, item_path or found_item
    return user_path, item_path


def read_table(path: Path, kind: str, id_col: str | None = None) -> FeatureTable:
    """A feature table for `kind` ("user" or "item"); DataError if it cannot be read at all."""
    if not path.is_file():
        raise DataError(str(path), "no such feature file", hint=f"check --{kind}-features")
    readers = {
        "u.user": _ml100k_users,
        "u.item": _ml100k_items,
        "users.dat": _ml1m_users,
        "movies.dat": _ml_movies,
        "movies.csv": _ml_movies,
    }
    name = path.name.removesuffix(".gz")
    if name in readers:
        return readers[name](path)
    return _generic(path, kind, id_col)


def _lines(path: Path, sep: str) -> list[list[str]]:
    text = decode(path.read_bytes()).lstrip("\ufeff")
    return [ln.rstrip("\r").split(sep) for ln in text.split("\n") if ln.strip()]


def _age_bucket(text: str) -> str | None:
    try:
        age = int(float(text))
    except ValueError:
        return None
    return AGE_BUCKETS[int(np.searchsorted(_AGE_EDGES, age, side="right"))]


def _users(rows, n_fields: int, cols: dict[str, int]) -> FeatureTable:
    table = FeatureTable(
        kinds={k: "categorical" for k in ("age", "gender", "occupation", "zip")},
        order={"age": AGE_BUCKETS},
    )
    for name in table.kinds:
        table.values[name] = {}
    for row in rows:
        if len(row) != n_fields or not row[0].strip():
            table.skipped_rows += 1
            continue
        uid = row[0].strip()
        table.values["age"][uid] = _age_bucket(row[cols["age"]])
        table.values["gender"][uid] = row[cols["gender"]].strip() or None
        table.values["occupation"][uid] = row[cols["occupation"]].strip() or None
        table.values["zip"][uid] = row[cols["zip"]].strip()[:1].upper() or None
    return table


def _ml100k_users(path: Path) -> FeatureTable:
    return _users(_lines(path, "|"), 5, {"age": 1, "gender": 2, "occupation": 3, "zip": 4})


def _ml1m_users(path: Path) -> FeatureTable:
    return _users(_lines(path, "::"), 5, {"gender": 1, "age": 2, "occupation": 3, "zip": 4})


def _items_table() -> FeatureTable:
    return FeatureTable(
        values={"genres": {}, "year": {}},
        kinds={"genres": MULTI, "year": "categorical"},
        order={"genres": GENRES},
    )


def _decade(text: str) -> str | None:
    years = re.findall(r"(1[89]\d\d|20\d\d)", text)
    return f"{int(years[-1]) // 10 * 10}s" if years else None


def _ml100k_items(path: Path) -> FeatureTable:
    table = _items_table()
    for row in _lines(path, "|"):
        if len(row) != 5 + len(GENRES) or not row[0].strip():
            table.skipped_rows += 1
            continue
        iid = row[0].strip()
        table.values["genres"][iid] = [
            g for g, flag in zip(GENRES, row[5:], strict=True) if flag.strip() == "1"
        ]
        table.values["year"][iid] = _decade(row[2])
    return table


def _ml_movies(path: Path) -> FeatureTable:
    """movies.dat (`id::title::A|B`) or movies.csv (header `movieId,title,genres`)."""
    table = _items_table()
    if path.name.removesuffix(".gz") == "movies.csv":
        rows = list(csv.reader(decode(path.read_bytes()).lstrip("\ufeff").splitlines()))[1:]
    else:
        rows = _lines(path, "::")
    for row in rows:
        if len(row) != 3 or not row[0].strip():
            table.skipped_rows += 1
            continue
        iid = row[0].strip()
        table.values["genres"][iid] = [
            g for g in row[2].split("|") if g and g != "(no genres listed)"
        ]
        table.values["year"][iid] = _decade(row[1])
    return table


def _generic(path: Path, kind: str, id_col: str | None) -> FeatureTable:
    name = path.name.removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            frame = pd.read_parquet(path)
        elif name.endswith((".jsonl", ".json")):
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            frame = pd.read_csv(
                path, sep="\t" if name.endswith(".tsv") else ",", dtype=str, keep_default_na=False
            )
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(str(path), f"cannot read the feature table: {exc}") from exc
    id_col = (
        id_col
        if id_col in frame.columns
        else (f"{kind}_id" if f"{kind}_id" in frame.columns else frame.columns[0])
    )
    ids = frame[id_col].astype(str).str.strip()
    table = FeatureTable()
    for col in frame.columns:
        if col == id_col:
            continue
        feature = re.sub(r"\W+", "_", str(col)).strip("_").lower() or "col"
        values, table.kinds[feature] = _column_values(frame[col])
        table.values[feature] = dict(zip(ids, values, strict=True))
    return table


def _column_values(series: pd.Series) -> tuple[list, str]:
    if series.map(lambda v: isinstance(v, (list, np.ndarray))).any():
        return [
            None if not isinstance(v, (list, np.ndarray)) else [str(x) for x in v] for v in series
        ], MULTI
    numeric = pd.to_numeric(series.replace("", np.nan), errors="coerce")
    if numeric.notna().sum() == series.replace("", np.nan).notna().sum() and numeric.nunique() > 20:
        deciles = pd.qcut(numeric, 10, labels=False, duplicates="drop")
        return [None if pd.isna(d) else f"q{int(d) + 1:02d}" for d in deciles], "categorical"
    return [
        None
        if (v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "")
        else str(v).strip()
        for v in series
    ], "categorical"


def encode(table: FeatureTable, ids: list[str], previous: dict | None = None) -> tuple[dict, dict]:
    """Feature columns aligned with `ids` (vocab order) and their manifest entries."""
    columns, entries = {}, {}
    for name in sorted(table.values):
        kind = table.kinds[name]
        by_id = table.values[name]
        seen = set()
        for v in by_id.values():
            seen.update(v if isinstance(v, list) else ([v] if v is not None else []))
        old = list((previous or {}).get(name, {}).get("values", []))
        preferred = table.order.get(name, [])
        new = [v for v in preferred if v in seen and v not in old]
        new += sorted(seen - set(old) - set(new))
        values = old + new
        index = {v: i + 1 for i, v in enumerate(values)}
        raw = [by_id.get(i) for i in ids]
        if kind == MULTI:
            col = pa.array([[index[v] for v in (r or [])] for r in raw], pa.list_(pa.int32()))
        else:
            col = pa.array([index.get(r, 0) if r is not None else 0 for r in raw], pa.int32())
        columns[f"feat_{name}"] = col
        entries[name] = {
            "kind": kind,
            "column": f"feat_{name}",
            "cardinality": len(values) + 1,
            "values": values,
        }
    return columns, entries
