"""Id numbering by keyed hash, kept across --vocab-from (p5ray/vocab.py): no Ray."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p5ray.errors import DataError
from p5ray.ingest import vocab


def test_numbering_ignores_the_order_ids_arrive_in():
    ids = [f"item{i}" for i in range(200)]
    forward = vocab.assign(ids, seed=42)
    assert vocab.assign(reversed(ids), seed=42) == forward
    assert sorted(forward) == sorted(ids)
    assert forward != ids and forward != sorted(ids)  # neither first appearance nor lexical


def test_the_seed_changes_the_numbering_and_is_stable():
    ids = [str(i) for i in range(50)]
    assert vocab.assign(ids, seed=1) != vocab.assign(ids, seed=2)
    assert vocab.id_hash("007", 42) != vocab.id_hash("7", 42)
    assert vocab.id_hash("café", 42) == vocab.id_hash("café", 42)


def test_known_ids_keep_their_place_and_new_ones_are_appended():
    known = ["b", "a", "c"]
    out = vocab.assign(["a", "z", "y", "c"], seed=42, known=known)
    assert out[:3] == known and sorted(out[3:]) == ["y", "z"]
    assert out[3:] == vocab.assign(["y", "z"], seed=42)


def write_prepared(root, users, items, seed=7):
    root.mkdir()
    (root / "manifest.json").write_text(
        json.dumps({"vocab_seed": seed, "item_features": {"x": {"values": ["v"]}}})
    )
    pq.write_table(
        pa.table({"user_idx": pa.array(range(1, len(users) + 1), pa.int32()), "user_id": users}),
        root / "users.parquet",
    )
    pq.write_table(
        pa.table({"item_idx": pa.array(range(1, len(items) + 1), pa.int32()), "item_id": items}),
        root / "items.parquet",
    )


def test_load_previous(tmp_path):
    write_prepared(tmp_path / "old", ["u2", "u1"], ["i1"])
    prev = vocab.load_previous(str(tmp_path / "old"))
    assert (prev.users, prev.items, prev.seed) == (["u2", "u1"], ["i1"], 7)
    assert prev.features["item"] == {"x": {"values": ["v"]}}


def test_load_previous_refuses_what_is_not_a_prepared_dir(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        vocab.load_previous(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="cannot read the user vocab"):
        vocab.load_previous(str(tmp_path))
