"""`p5ray prepare` end to end on Ray (p5ray/prepare.py) and through the CLI.

Pure parts are tested in test_readers/test_parsers/test_events/test_vocab/test_features.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from p5ray import prepare
from p5ray.errors import DataError, OutputExistsError

ROOT = Path(__file__).parent.parent
DATA = ROOT / "data"
FIXTURES = Path(__file__).parent / "fixtures" / "prepare"
OUTPUT_FILES = [
    "cross_sell.parquet",
    "items.parquet",
    "manifest.json",
    "quarantine/rows.csv",
    "sequences.parquet",
    "test.parquet",
    "train.parquet",
    "users.parquet",
    "valid.parquet",
]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    started = not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    if started:
        ray.shutdown()


def prep(input, out, **kw):
    return prepare.run(prepare.PrepareOptions(input=str(input), out=str(out), **kw))


def read(out, name):
    return pq.read_table(Path(out) / f"{name}.parquet").to_pandas()


def check_accounting(m):
    assert m["rows_in"] == m["rows_kept"] + m["rows_quarantined"] + m["rows_dropped"]
    assert m["rows_quarantined"] == sum(m["quarantined_by_reason"].values())
    assert m["rows_dropped"] == sum(m["dropped_by_reason"].values())
    assert m["interactions"] == m["rows_kept"]


@pytest.fixture(scope="module")
def ml100k(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "ml-100k"
    return out, prep(DATA / "ml-100k" / "u.data", out)


def test_ml100k_counts_files_and_features(ml100k):
    out, m = ml100k
    assert (
        sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == OUTPUT_FILES
    )
    assert (m["users"], m["items"], m["interactions"], m["rows_in"]) == (943, 1682, 100000, 100000)
    assert (m["users_eval"], m["users_train_only"], m["format"]) == (943, 0, "movielens")
    assert (m["has_ratings"], m["rating_min"], m["rating_max"], m["has_timestamps"]) == (
        True,
        1.0,
        5.0,
        True,
    )
    check_accounting(m)
    assert set(m["user_features"]) == {"age", "gender", "occupation", "zip"}
    assert m["item_features"]["genres"]["cardinality"] == 20
    users, items = read(out, "users"), read(out, "items")
    assert users["user_idx"].tolist() == list(range(1, 944)) and items["item_idx"].tolist() == list(
        range(1, 1683)
    )
    assert users["n_interactions"].sum() == 100000 and users["feat_age"].min() >= 1
    assert json.loads((out / "manifest.json").read_text())["files"]["train.parquet"]


def test_ml100k_targets_are_last_by_timestamp_then_file_line(ml100k):
    out, _ = ml100k
    raw = pd.read_csv(DATA / "ml-100k" / "u.data", sep="\t", names=["u", "i", "r", "t"], dtype=str)
    raw["line"], raw["t"] = np.arange(1, len(raw) + 1), raw["t"].astype(int)
    raw = raw.sort_values(["u", "t", "line"])
    expect = {u: g["i"].tolist() for u, g in raw.groupby("u")}
    uid = dict(zip(read(out, "users")["user_idx"], read(out, "users")["user_id"], strict=True))
    iid = dict(zip(read(out, "items")["item_idx"], read(out, "items")["item_id"], strict=True))
    for name, back in (("valid", 2), ("test", 1)):
        split = read(out, name)
        assert len(split) == 943
        for u, history, target in zip(
            split["user_idx"], split["history"], split["target"], strict=True
        ):
            seq = expect[uid[u]]
            assert iid[target] == seq[-back] and [iid[i] for i in history] == seq[:-back]
    seqs = read(out, "sequences")
    assert all(list(ts) == sorted(ts) for ts in seqs["timestamps"])


def test_ml100k_popularity_pairs_and_numbering(ml100k):
    out, m = ml100k
    train, items, pairs = read(out, "train"), read(out, "items"), read(out, "cross_sell")
    counts = np.bincount(np.concatenate(train["items"].to_numpy()), minlength=1683)
    assert (items["train_count"].to_numpy() == counts[1:]).all()
    assert pairs["count"].sum() == sum(len(x) - 1 for x in train["items"])
    assert list(zip(pairs["item_a"], pairs["item_b"], strict=True)) == sorted(
        zip(pairs["item_a"], pairs["item_b"], strict=True)
    )
    assert m["cross_sell_pairs"] == len(pairs)
    first_seen = pd.read_csv(
        DATA / "ml-100k" / "u.data", sep="\t", names=["u", "i", "r", "t"], dtype=str
    )["i"].unique()
    by_id = dict(zip(items["item_id"], items["item_idx"], strict=True))
    assert abs(np.corrcoef(np.arange(len(first_seen)), [by_id[i] for i in first_seen])[0, 1]) < 0.1


def tree_bytes(out):
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(Path(out).rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def test_beauty_is_byte_identical_whatever_the_parallelism(ray_session, tmp_path):
    a = prep(DATA / "amazon-beauty" / "Beauty.txt", tmp_path / "a", format="sequence")
    b = prep(
        DATA / "amazon-beauty" / "Beauty.txt",
        tmp_path / "b",
        format="sequence",
        chunk_bytes=100_000,
        rows_per_bucket=40_000,
    )
    assert (a["users"], a["items"], a["interactions"], a["users_eval"]) == (
        22363,
        12101,
        198502,
        22363,
    )
    assert {k: v for k, v in a.items() if k not in ("elapsed_s", "stage_s")} == {
        k: v for k, v in b.items() if k not in ("elapsed_s", "stage_s")
    }
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert a["has_ratings"] is False and read(tmp_path / "a", "test")["target_rating"].isna().all()


@pytest.fixture(scope="module")
def messy(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy") / "out"
    return out, prep(
        FIXTURES / "messy.csv", out, max_bad_fraction=0.3, cross_sell_events=("view", "purchase")
    )


def sequences_by_id(out):
    users, items = read(out, "users"), read(out, "items")
    uid = dict(zip(users["user_idx"], users["user_id"], strict=True))
    iid = dict(zip(items["item_idx"], items["item_id"], strict=True))
    return {
        uid[u]: [iid[i] for i in seq]
        for u, seq in zip(
            read(out, "sequences")["user_idx"], read(out, "sequences")["items"], strict=True
        )
    }


def test_messy_log_every_trap(messy):
    out, m = messy
    check_accounting(m)
    assert (m["rows_in"], m["rows_kept"], m["rows_quarantined"], m["rows_dropped"]) == (
        20,
        13,
        5,
        2,
    )
    assert m["quarantined_by_reason"] == {
        "bad_rating": 1,
        "bad_timestamp": 1,
        "missing_user_id": 1,
        "unclosed_quote": 1,
        "wrong_field_count": 1,
    }
    assert m["dropped_by_reason"] == {"blank_line": 1, "duplicate": 1, "short_user": 0}
    assert (m["users"], m["items"], m["users_eval"], m["users_train_only"]) == (5, 9, 3, 2)
    seqs = sequences_by_id(out)
    assert seqs["007"] == [
        "i5",
        "i9",
        "i3",
        "i,7",
    ]  # ts 90, 100 (line 2), 100 (line 3), 110; duplicate gone
    assert seqs["7"] == ["i1", "i2"] and seqs["u-one"] == [
        "i1"
    ]  # "7" is not "007"; short: train only
    assert seqs["café"] == ["ü1", "ü2", "ü1"]  # BOM, CRLF, non-ASCII
    with open(out / "quarantine" / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["line"], r["reason"]) for r in rows] == [
        ("13", "wrong_field_count"),
        ("14", "unclosed_quote"),
        ("15", "bad_timestamp"),
        ("16", "bad_rating"),
        ("17", "missing_user_id"),
    ]
    assert rows[0]["raw"] == "bad,row" and rows[0]["source"].endswith("messy.csv")
    pairs = read(out, "cross_sell")
    items = dict(zip(read(out, "items")["item_idx"], read(out, "items")["item_id"], strict=True))
    assert sorted(
        (items[a], items[b]) for a, b in zip(pairs["item_a"], pairs["item_b"], strict=True)
    ) == [("i1", "i2"), ("i5", "i9")]


def test_short_users_can_be_dropped(ray_session, tmp_path):
    m = prep(FIXTURES / "messy.csv", tmp_path / "out", max_bad_fraction=0.3, short_users="drop")
    check_accounting(m)
    assert m["dropped_by_reason"]["short_user"] == 3 and (
        m["users"],
        m["items"],
        m["users_dropped"],
    ) == (3, 8, 2)
    assert set(sequences_by_id(tmp_path / "out")) == {"007", "café", "u9"}
    assert m["cross_sell_events"] == ["purchase"] and m["cross_sell_pairs"] == 0


def test_vocab_from_keeps_known_indices(messy, tmp_path):
    old, _ = messy
    m = prep(FIXTURES / "today.csv", tmp_path / "new", vocab_from=str(old))
    assert (m["new_users"], m["new_items"], m["users"], m["items"]) == (1, 1, 6, 10)
    for kind in ("users", "items"):
        before, after = read(old, kind), read(tmp_path / "new", kind)
        key = kind[:-1]
        assert after[f"{key}_id"].tolist()[: len(before)] == before[f"{key}_id"].tolist()
    assert read(tmp_path / "new", "users")["user_id"].tolist()[-1] == "newu"
    assert read(tmp_path / "new", "items")["item_id"].tolist()[-1] == "inew"
    assert sequences_by_id(tmp_path / "new")["newu"] == ["i3", "inew", "i1"]


def test_purchases_feed_cross_sell(ray_session, tmp_path):
    m = prep(FIXTURES / "events.jsonl", tmp_path / "out")
    assert m["format"] == "jsonl" and m["event_types"] == {"purchase": 6, "view": 4}
    items = dict(
        zip(
            read(tmp_path / "out", "items")["item_idx"],
            read(tmp_path / "out", "items")["item_id"],
            strict=True,
        )
    )
    pairs = read(tmp_path / "out", "cross_sell")
    assert [
        (items[a], items[b], c)
        for a, b, c in zip(pairs["item_a"], pairs["item_b"], pairs["count"], strict=True)
    ] == [("b", "d", 2)]
    assert read(tmp_path / "out", "sequences")["events"].map(list).tolist()[0] in (
        ["view", "purchase", "view", "purchase", "purchase", "purchase"],
        ["purchase", "purchase", "view", "view"],
    )


def big_csv(path, n, bad_every=None):
    with open(path, "w") as f:
        f.write("user_id,item_id,timestamp,rating\n")
        for i in range(n):
            line = i + 2
            if line == n // 2:
                f.write("u1,i1,1\n")  # wrong field count, mid-file
            elif line == n // 2 + 1:
                f.write('u1,"i2,2,3\n')  # unclosed quote
            elif bad_every and i % bad_every == 0:
                f.write(f"u{i % 300},i{i % 500},{i},lots\n")
            else:
                f.write(f"u{i % 300},i{i % 500},{i},{1 + i % 5}\n")


def test_malformed_rows_mid_file_across_read_ranges(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PREFLIGHT_BYTES", 0)  # the Ray path decides, not the preflight
    big_csv(tmp_path / "big.csv", 20_000)
    m = prep(tmp_path / "big.csv", tmp_path / "out", chunk_bytes=50_000)
    assert m["quarantined_by_reason"] == {"unclosed_quote": 1, "wrong_field_count": 1}
    lines = [r["line"] for r in csv.DictReader(open(tmp_path / "out" / "quarantine" / "rows.csv"))]
    assert lines == ["10000", "10001"] and m["rows_kept"] == 19_998
    big_csv(tmp_path / "bad.csv", 20_000, bad_every=50)
    with pytest.raises(DataError, match="rows are bad") as err:
        prep(tmp_path / "bad.csv", tmp_path / "out2", chunk_bytes=50_000)
    assert err.value.line == 2 and "non-numeric rating" in err.value.one_line()
    assert not (tmp_path / "out2").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.csv",
        "big.csv",
        "out",
    ]


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "p5ray.cli", "prepare", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


# bad input files through the CLI (exit 2, one line, no output): the corpus in test_bad_input.py


def test_cli_success_then_existing_out_is_refused(tmp_path):
    res = cli("--input", FIXTURES / "ratings.dat", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    summary, last = res.stdout.strip().splitlines()
    assert json.loads(summary)["interactions"] == 6 and last == f"data: {tmp_path / 'out'}"
    assert "picked movielens" in res.stderr
    again = cli("--input", FIXTURES / "ratings.dat", "--out", tmp_path / "out", "--quiet")
    assert (
        again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    )
    with pytest.raises(OutputExistsError):
        prep(FIXTURES / "ratings.dat", tmp_path / "out")


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_scale", ROOT / "bench" / "prepare_scale.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_bench_baseline_agrees_with_prepare(ml100k, tmp_path):
    """The bench's pandas baseline runs the same steps: on ML-100K its tables equal prepare's."""
    bench = load_bench()
    assert bench.build_log(tmp_path / "log.data", 1) == 100_000
    bench.baseline(str(tmp_path / "log.data"), str(tmp_path / "base"))
    out, _ = ml100k
    for name in ("sequences", "train", "valid", "test", "cross_sell"):
        ours = pq.read_table(out / f"{name}.parquet")
        theirs = pq.read_table(tmp_path / "base" / f"{name}.parquet").cast(ours.schema)
        assert ours.equals(theirs), name
    assert bench.tree_pss_bytes(os.getpid()) > 10 << 20
