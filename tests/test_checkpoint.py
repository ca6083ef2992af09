import json

import pyarrow as pa
import pytest
import torch

from p5ray import checkpoint as ckpt
from p5ray import train
from p5ray.config import load_config
from p5ray.errors import CheckpointError


def _tables(n_items=30, n_users=5):
    items = pa.table({
        "item_idx": pa.array(range(1, n_items + 1), pa.int32()),
        "item_id": [f"i{k}" for k in range(1, n_items + 1)],
        "train_count": pa.array([n_items - k for k in range(n_items)], pa.int64()),
    })
    users = pa.table({
        "user_idx": pa.array(range(1, n_users + 1), pa.int32()),
        "user_id": [f"u{k}" for k in range(1, n_users + 1)],
        "history": pa.array([[1, 2, 3]] * n_users, pa.list_(pa.int32())),
    })
    return items, users


@pytest.fixture
def saved(tmp_path):
    cfg = load_config(None, ["model.dim=8", "model.max_len=5", "model.tower_dim=8"])
    manifest = {"items": 30, "users": 5, "has_ratings": True}
    model = train.build_model(train.build_spec(cfg, manifest, 3.5), *_tables())
    items, users = _tables()
    path = ckpt.save(tmp_path / "ck", model, cfg, items, users, {"epoch": 3}, {"epoch": 3})
    return path, model, cfg


def test_round_trip_restores_weights_config_and_vocab(saved):
    path, model, cfg = saved
    loaded = ckpt.load(path)
    assert loaded.config == cfg and loaded.meta["epoch"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.items.column("item_id").to_pylist()[:2] == ["i1", "i2"]
    assert loaded.model.spec.rating_mean == 3.5
    assert ckpt.load_train_state(path)["epoch"] == 3
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_tampered_and_truncated_files_are_refused(saved):
    path, _, _ = saved
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.pt does not match"):
        ckpt.load(path)
    (path / "model.pt").write_bytes(data)
    ckpt.load(path)
    (path / "items.parquet").write_bytes(b"x" + (path / "items.parquet").read_bytes()[1:])
    with pytest.raises(CheckpointError, match="items.parquet"):
        ckpt.load(path)


def test_missing_and_foreign_directories(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a p5ray checkpoint"):
        ckpt.load(tmp_path / "empty")
    path, _, _ = saved
    (path / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.load(path)


def test_pickled_objects_are_not_loaded(saved, tmp_path):
    path, model, _ = saved
    meta = json.loads((path / "meta.json").read_text())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "model.pt")
    meta["sha256"]["model.pt"] = ckpt._sha256(path / "model.pt")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        ckpt.load(path)


def test_vocab_mismatch_is_refused(saved):
    path, _, _ = saved
    loaded = ckpt.load(path)
    items, users = _tables()
    ckpt.check_fits_data(loaded, items, users, "same")
    other_items, _ = _tables(n_items=31)
    with pytest.raises(CheckpointError, match="other data"):
        ckpt.check_fits_data(loaded, other_items, users, "other")


def test_feature_buffers_of_any_width_round_trip(tmp_path):
    from p5ray.model import FeatureSpec

    cfg = load_config(None, ["model.dim=8", "model.max_len=5", "model.tower_dim=8"])
    manifest = {"items": 30, "users": 5, "has_ratings": False,
                "item_features": {"genres": {"kind": "multi_categorical", "cardinality": 6}}}
    spec = train.build_spec(cfg, manifest)
    assert spec.item_features == (FeatureSpec("genres", "multi_categorical", 6),)
    items, users = _tables()
    genres = pa.array([[1 + k % 5, 1 + (k + 1) % 5, 1 + (k + 2) % 5][: 1 + k % 3] for k in range(30)], pa.list_(pa.int32()))
    items = items.append_column("feat_genres", genres)
    model = train.build_model(spec, items, users)
    assert model.items.features.values_genres.shape == (31, 3)
    loaded = ckpt.load(ckpt.save(tmp_path / "ck", model, cfg, items, users, {}))
    assert torch.equal(loaded.model.items.features.values_genres, model.items.features.values_genres)
