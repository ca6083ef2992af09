"""Continuous training: `warm_start` alone (no Ray), then the whole day-to-day cycle on ML-100K
split by global time: prepare yesterday -> train -> prepare today --vocab-from yesterday ->
train --init-from (warm) against a cold train with the same epochs -> hot swap on a live server."""

import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch

from p5ray import checkpoint as ckpt
from p5ray import dataset, evaluate, prepare, server, train
from p5ray.config import Config, load_config, replace
from p5ray.errors import CheckpointError
from p5ray.warmstart import warm_start
from tests.helpers import DATA, TINY, TINY_MODEL, make_checkpoint
from tests.helpers_data import prepare_ml100k

EPOCHS_YESTERDAY = 2
EPOCHS_TODAY = 1
YESTERDAY_FRACTION = 0.8

# -- pure: warm_start copies known rows by raw id -------------------------------------------------


def test_warm_start_copies_known_items_by_id_and_keeps_new_rows_fresh(tmp_path):
    old = ckpt.load(make_checkpoint(tmp_path / "old", num_items=60, num_users=20))
    ids = [f"i{i}" for i in range(1, 71)]  # ten new items; indices deliberately reversed
    new_items = pa.table({"item_idx": pa.array(range(70, 0, -1), pa.int32()), "item_id": ids,
                          "train_count": pa.array([1] * 70, pa.int64())})
    cfg = replace(Config(), model=TINY_MODEL)
    spec = train.build_spec(cfg, {"items": 70, "users": 25, "has_ratings": True}, rating_mean=3.5)
    torch.manual_seed(1)
    model = train.build_model(spec, new_items, pa.table({"user_idx": pa.array([], pa.int32())}))
    fresh_rows = model.items.embedding.weight.detach().clone()
    info = warm_start(model, str(old.path), new_items)
    assert info["known_items"] == 60
    weights, old_weights = model.items.embedding.weight.detach(), old.model.items.embedding.weight
    for i in range(1, 61):
        assert torch.equal(weights[71 - i], old_weights[i])  # item i{i}: old row i, new row 71 - i
    assert torch.equal(weights[1:11], fresh_rows[1:11])  # i61..i70 keep the fresh initialisation
    encoder = "encoder.norm.weight"
    assert torch.equal(model.state_dict()[encoder], old.model.state_dict()[encoder])


def test_a_checkpoint_of_another_width_is_refused_before_ray_starts(tmp_path):
    old = make_checkpoint(tmp_path / "old")  # model.dim 16
    data = prepare_ml100k(tmp_path / "data", max_users=20)
    with pytest.raises(CheckpointError, match="model width 16 differs from model.dim 64") as info:
        train.fit(str(data), Config(), storage=str(tmp_path / "runs"), init_from=str(old))
    assert info.value.exit_code == 2 and not (tmp_path / "runs").exists()


# -- the day-to-day cycle on real data -------------------------------------------------------------


def split_by_time(root: Path) -> tuple[Path, Path]:
    """yesterday/u.data: the earliest 80 % of ML-100K's rows by global timestamp; today: all rows."""
    lines = (DATA / "ml-100k" / "u.data").read_text().splitlines(keepends=True)
    stamps = np.array([int(line.split("\t")[3]) for line in lines])
    cutoff = np.sort(stamps)[int(YESTERDAY_FRACTION * len(lines)) - 1]
    out = []
    for name, rows in (("yesterday", [ln for ln, t in zip(lines, stamps, strict=True) if t <= cutoff]), ("today", lines)):
        (root / name).mkdir()
        (root / name / "u.data").write_text("".join(rows))
        for side in ("u.item", "u.user"):
            shutil.copy(DATA / "ml-100k" / side, root / name / side)
        out.append(root / name / "u.data")
    return out[0], out[1]


@dataclass
class Cycle:
    yesterday: Path  # prepared data directories
    today: Path
    old: Path  # checkpoints: trained on yesterday, then today warm and cold
    warm: Path
    cold: Path
    scores: dict  # test full/ndcg@10 on today of warm, cold and the popularity baseline


@pytest.fixture(scope="module")
def cycle(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("continuous")
    raw_yesterday, raw_today = split_by_time(root)
    yesterday, today = root / "data-yesterday", root / "data-today"
    prepare.run(prepare.PrepareOptions(input=str(raw_yesterday), out=str(yesterday)))
    prepare.run(prepare.PrepareOptions(input=str(raw_today), out=str(today), vocab_from=str(yesterday)))

    def fit(data: Path, epochs: int, name: str, init_from: Path | None = None) -> Path:
        cfg = load_config(TINY, [f"train.epochs={epochs}"])
        result = train.fit(str(data), cfg, storage=str(root / "runs"), name=name, init_from=str(init_from) if init_from else None)
        return Path(result.checkpoint)

    old = fit(yesterday, EPOCHS_YESTERDAY, "yesterday")
    warm = fit(today, EPOCHS_TODAY, "today-warm", init_from=old)
    cold = fit(today, EPOCHS_TODAY, "today-cold")
    warm_metrics, cold_metrics = (evaluate.run(str(c), str(today)) for c in (warm, cold))
    scores = {"warm": warm_metrics["full/ndcg@10"], "cold": cold_metrics["full/ndcg@10"],
              "popularity": cold_metrics["baseline/popularity/full/ndcg@10"]}
    print(f"\ntoday's test full/ndcg@10 after {EPOCHS_TODAY} epoch(s): {json.dumps(scores)}")
    return Cycle(yesterday, today, old, warm, cold, scores)


def id_index(data: Path, kind: str) -> dict[str, int]:
    table = dataset.read_table(data, f"{kind}s.parquet")
    return dict(zip(table.column(f"{kind}_id").to_pylist(), table.column(f"{kind}_idx").to_pylist(), strict=True))


@pytest.mark.slow
def test_old_ids_keep_their_indices_and_new_ids_are_counted(cycle):
    raw = {name: [line.split("\t")[:2] for line in open(cycle.yesterday.parent / name / "u.data")] for name in ("yesterday", "today")}
    manifest = dataset.read_manifest(cycle.today)
    for kind, column in (("user", 0), ("item", 1)):
        before, after = id_index(cycle.yesterday, kind), id_index(cycle.today, kind)
        assert all(after[i] == idx for i, idx in before.items())
        new = {row[column] for row in raw["today"]} - {row[column] for row in raw["yesterday"]}
        assert manifest[f"new_{kind}s"] == len(new) == len(after) - len(before) > 0
        assert sorted(after[i] for i in new) == list(range(len(before) + 1, len(after) + 1))


@pytest.mark.slow
def test_warm_start_is_at_least_as_good_as_cold_after_the_same_epochs(cycle):
    assert cycle.scores["warm"] >= cycle.scores["cold"], cycle.scores


@pytest.mark.slow
def test_warm_checkpoint_is_a_new_version_that_records_its_origin(cycle):
    old, warm, cold = (ckpt.read_meta(c) for c in (cycle.old, cycle.warm, cycle.cold))
    assert len({old["model_version"], warm["model_version"], cold["model_version"]}) == 3
    assert warm["init_from"] == str(cycle.old.resolve()) and "init_from" not in cold
    assert warm["vocab_fingerprint"] == cold["vocab_fingerprint"] != old["vocab_fingerprint"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_running_server_hot_swaps_to_the_warm_checkpoint(cycle):
    from ray import serve

    newcomer = sorted(set(id_index(cycle.today, "user")) - set(id_index(cycle.yesterday, "user")))[0]
    versions = {c: ckpt.read_meta(c)["model_version"] for c in (cycle.old, cycle.warm)}
    config = server.serve_config(str(cycle.old), "127.0.0.1", free_port(), free_port())
    config["applications"] = config["applications"][:1]  # the combined app
    server.start_serve(config)
    try:
        server.deploy(config, timeout_s=400)
        with httpx.Client(base_url=f"http://127.0.0.1:{config['http_options']['port']}", timeout=120) as http:
            before = http.post("/v1/recommend", json={"user_id": newcomer, "k": 5}).json()
            assert before["model_version"] == versions[cycle.old] and before["cold_start"]
            server.deploy(server.swap_checkpoint(config, str(cycle.warm)), timeout_s=400)
            deadline = time.monotonic() + 300
            while set(http.get("/healthz").json()["model_version"].values()) != {versions[cycle.warm]}:
                assert time.monotonic() < deadline, "the weights were not swapped"
                time.sleep(0.5)
            after = http.post("/v1/recommend", json={"user_id": newcomer, "k": 5}).json()
            assert after["model_version"] == versions[cycle.warm] and not after["cold_start"]
    finally:
        serve.shutdown()
