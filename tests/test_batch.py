"""batch-recommend (p5ray/batch.py): the plain batch functions without Ray, then the Ray Data job
on real prepared data and a model trained for real, checked against the serving core, the live
`/v1/recommend` of a running Serve app, and the contract (ranks 1..K, no seen item, string ids)."""

import socket
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from p5ray import batch, dataset, server
from p5ray.errors import CheckpointError, OutputExistsError, P5RayError
from p5ray.inference import Recommender
from tests.helpers import DATA, TINY_MODEL, make_checkpoint, run_cli
from tests.helpers_batch import checkpoint_for_data
from tests.helpers_data import prepare_ml100k

K = 10


def read(path: Path):
    return pads.dataset(str(path), format="parquet").to_table().to_pandas()


def rows_of(table, key: str, value: str) -> list[tuple[str, float]]:
    """(item, score) rows of one user/item, in rank order."""
    df = table[table[key] == value].sort_values("rank")
    other = "item_id" if key == "user_id" else "cross_sell_item_id"
    return list(zip(df[other], df["score"].astype(float), strict=True))


def assert_same_answer(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-6, atol=1e-7)


# -- pure: the batch functions on a synthetic checkpoint (no Ray) ---------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("batch") / "c", num_items=300, num_users=40)


def test_batch_rows_equal_the_core_recommend_of_each_user(synthetic):
    core = Recommender(str(synthetic))
    users = [f"u{u}" for u in range(1, 41)]
    table = batch.recommend_users(core, users, K).to_pandas()
    assert table.columns.tolist() == ["user_id", "rank", "item_id", "score"]
    for user in users:
        assert rows_of(table, "user_id", user) == core.recommend(user, k=K).items  # exactly, floats too
    assert (table.groupby("user_id")["rank"].apply(list) == [list(range(1, K + 1))] * 40).all()


def test_tiny_catalog_chunks_give_identical_rows(synthetic):
    users = [f"u{u}" for u in range(1, 41)]
    whole = batch.recommend_users(Recommender(str(synthetic)), users, K)
    chunked = batch.recommend_users(Recommender(str(synthetic), chunk_items=7), users, K)
    assert chunked.equals(whole)


def test_the_seen_item_check_catches_a_leak(synthetic):
    core = Recommender(str(synthetic))
    batch.check_unseen(core, "u1", [("i30", 1.0)])  # u1's history is i1..i5
    with pytest.raises(P5RayError, match="i3"):
        batch.check_unseen(core, "u1", [("i30", 1.0), ("i3", 0.5)])


def test_cross_sell_rows_equal_the_core_answer(synthetic):
    core = Recommender(str(synthetic))
    table = batch.cross_sell_items(core, ["i1", "i7"], 5).to_pandas()
    for item in ("i1", "i7"):
        got = rows_of(table, "item_id", item)
        assert got == core.cross_sell([item], 5).items and item not in [i for i, _ in got]


def test_user_list_keeps_ids_as_written_and_reports_unknown(tmp_path):
    listed = tmp_path / "users.txt"
    listed.write_text("007\n7\n\n007\r\nu2\n")
    assert batch.read_user_list(str(listed)) == ["007", "7", "u2"]
    known = pa.table({"user_id": ["u1", "7", "u2"]})
    assert batch.select_users(known, ["007", "7", "u2"]) == (["7", "u2"], ["007"])
    assert batch.select_users(known, None) == (["u1", "7", "u2"], [])
    pq.write_table(pa.table({"user_id": ["u2", "x"]}), tmp_path / "users.parquet")
    assert batch.read_user_list(str(tmp_path / "users.parquet")) == ["u2", "x"]


def test_output_is_written_atomically(tmp_path):
    schema = batch.RECOMMENDATIONS
    rows = pa.table({"user_id": ["a"], "rank": [1], "item_id": ["b"], "score": [0.5]}, schema=schema)

    def failing():
        yield rows
        raise RuntimeError("actor died")

    for out in (tmp_path / "top.parquet", tmp_path / "top"):
        with pytest.raises(RuntimeError):
            batch.write_output(failing(), out, schema, False, 1, "users")
        assert list(tmp_path.iterdir()) == []  # nothing at --out, no temporary left behind
    assert batch.write_output(iter([rows, rows]), tmp_path / "top.parquet", schema, False, 2, "users").rows == 2
    assert pq.read_table(tmp_path / "top.parquet").num_rows == 2
    with pytest.raises(OutputExistsError):
        batch.write_output(iter([rows]), tmp_path / "top.parquet", schema, False, 1, "users")
    batch.write_output(iter([rows]), tmp_path / "top.parquet", schema, True, 1, "users")
    assert pq.read_table(tmp_path / "top.parquet").num_rows == 1


def test_a_single_file_holds_every_row_past_the_part_size(tmp_path, monkeypatch):
    """One .parquet output never rolls over (that left rows in unpublished parts); a directory does."""
    monkeypatch.setattr(batch, "ROWS_PER_FILE", 5)
    schema = batch.RECOMMENDATIONS

    def chunks():
        for b in range(4):
            n = 3
            yield pa.table({"user_id": [f"u{b}"] * n, "rank": list(range(1, n + 1)), "item_id": [f"i{j}" for j in range(n)],
                            "score": [0.5] * n}, schema=schema)

    assert batch.write_output(chunks(), tmp_path / "top.parquet", schema, False, 4, "users").rows == 12
    assert pq.read_table(tmp_path / "top.parquet").num_rows == 12
    batch.write_output(chunks(), tmp_path / "top", schema, False, 4, "users")
    parts = sorted((tmp_path / "top").glob("part-*.parquet"))
    assert len(parts) == 2 and sum(pq.read_table(p).num_rows for p in parts) == 12


@pytest.fixture(scope="module")
def pandas_data(tmp_path_factory):
    return prepare_ml100k(tmp_path_factory.mktemp("batch") / "data", max_users=20)


def test_existing_out_is_exit_2_before_ray_starts(tmp_path, synthetic, pandas_data):
    data = pandas_data
    (tmp_path / "out").mkdir()
    out = run_cli("batch-recommend", "--checkpoint", str(synthetic), "--data", str(data),
                  "--out", str(tmp_path / "out"), timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "already exists" in out.stderr.strip().splitlines()[-1]


def test_a_checkpoint_of_other_data_is_refused(pandas_data, synthetic, tmp_path):
    meta = batch.check_options(batch.BatchOptions(str(synthetic), str(pandas_data), str(tmp_path / "o")))
    with pytest.raises(CheckpointError, match="other data"):
        batch.check_fits(meta, str(synthetic), str(pandas_data))


def test_data_with_interactions_the_checkpoint_lacks_is_refused(pandas_data, tmp_path):
    """The mask is the checkpoint's stored history: it must hold every interaction of --data."""
    import shutil

    fitting = checkpoint_for_data(pandas_data, tmp_path / "c", model=TINY_MODEL)
    meta = batch.check_options(batch.BatchOptions(str(fitting), str(pandas_data), str(tmp_path / "o")))
    batch.check_fits(meta, str(fitting), str(pandas_data))
    grown = shutil.copytree(pandas_data, tmp_path / "grown")
    users = pq.read_table(grown / "users.parquet").to_pandas()
    users.loc[users.user_id == "3", "n_interactions"] += 1
    pq.write_table(pa.Table.from_pandas(users, preserve_index=False), grown / "users.parquet")
    with pytest.raises(CheckpointError, match="1 users differ, e.g. '3'"):
        batch.check_fits(meta, str(fitting), str(grown))


# -- the Ray Data job on real data and a really trained model --------------------------------


@pytest.fixture(scope="module")
def batch_run(tiny_checkpoint, ml_small_data, tmp_path_factory):
    """Every user, 2 actors, blocks of 32 users, a 100-item catalog chunk, cross-sell on."""
    out = tmp_path_factory.mktemp("batch-out") / "top"
    opts = batch.BatchOptions(str(tiny_checkpoint), str(ml_small_data), str(out), k=K, num_workers=2,
                              batch_size=32, chunk_items=100, cross_sell=True)
    return batch.run(opts), read(out), read(Path(str(out) + ".cross_sell"))


def history_of_raw_users(max_user: int = 150) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    with open(DATA / "ml-100k" / "u.data") as f:
        for line in f:
            u, i, _, _ = line.split("\t")
            if int(u) <= max_user:
                seen.setdefault(u, set()).add(i)
    return seen


@pytest.mark.slow
def test_every_user_gets_k_ranked_unseen_items(batch_run, ml_small_data):
    summary, table, _ = batch_run
    users = dataset.read_table(ml_small_data, "users.parquet").column("user_id").to_pylist()
    assert summary["users"] == len(users) == 150 and summary["rows"] == 150 * K and summary["users_per_s"] > 0
    assert table.user_id.map(type).eq(str).all() and table.item_id.map(type).eq(str).all()
    assert table.user_id.unique().tolist() == users  # every user, in index order
    assert (table.groupby("user_id")["rank"].apply(sorted) == [list(range(1, K + 1))] * 150).all()
    seen = history_of_raw_users()
    assert not any(i in seen[u] for u, i in zip(table.user_id, table.item_id, strict=True))
    best_first = table.sort_values(["user_id", "rank"]).groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing)
    assert best_first.all()


@pytest.mark.slow
def test_ray_output_equals_the_core_for_every_user(batch_run, tiny_checkpoint):
    summary, table, cross = batch_run
    core = Recommender(str(tiny_checkpoint))  # default chunk: the Ray run used 100-item chunks
    for user in table.user_id.unique():
        assert_same_answer(rows_of(table, "user_id", user), core.recommend(user, k=K).items)
    assert summary["cross_sell_rows"] == len(cross) == len(core.item_index) * K
    for item in list(core.item_index)[:20]:
        assert_same_answer(rows_of(cross, "item_id", item), core.cross_sell([item], K).items)


@pytest.mark.slow
def test_listed_users_only_unknown_ones_reported(tiny_checkpoint, ml_small_data, tmp_path):
    listed = tmp_path / "users.txt"
    listed.write_text("42\n1\n007\n42\nnobody\n")
    out = tmp_path / "some.parquet"
    opts = batch.BatchOptions(str(tiny_checkpoint), str(ml_small_data), str(out), k=3, users=str(listed))
    summary = batch.run(opts)
    table = pq.read_table(out).to_pandas()
    assert summary["users"] == 2 and summary["unknown_users"] == 2
    assert sorted(table.user_id.unique()) == ["1", "42"] and len(table) == 6
    with pytest.raises(OutputExistsError):
        batch.run(opts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_url(batch_run, tiny_checkpoint):
    """The combined Serve app on the same checkpoint (after the batch run: they share the CPUs)."""
    from ray import serve

    config = server.serve_config(str(tiny_checkpoint), "127.0.0.1", free_port(), free_port())
    config["applications"] = config["applications"][:1]
    server.start_serve(config)
    try:
        server.deploy(config, timeout_s=400)
        yield f"http://127.0.0.1:{config['http_options']['port']}"
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_batch_output_equals_live_v1_recommend(batch_run, live_url):
    _, table, _ = batch_run
    with httpx.Client(base_url=live_url, timeout=120) as http:
        for user in ["1", "2", "42", "99", "150"]:
            answer = http.post("/v1/recommend", json={"user_id": user, "k": K}).json()
            assert not answer["cold_start"]
            assert_same_answer(rows_of(table, "user_id", user), [(i["item_id"], i["score"]) for i in answer["items"]])
