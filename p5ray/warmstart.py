"""Warm start (`train --init-from CKPT`): copy an earlier model into one whose vocab grew.

Rows of items known to the old checkpoint are copied by raw id (prepare --vocab-from keeps their
indices, but matching on ids stays right even when it was not used); new items keep the fresh
N(0, 0.02) initialisation. Every other tensor of the same shape is copied as is.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import torch

from p5ray import checkpoint as ckpt
from p5ray.errors import CheckpointError
from p5ray.model import P5Rec

log = logging.getLogger(__name__)
ITEM_ROWS = "items.embedding.weight"


def item_index_map(old_items: pa.Table, new_items: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    """(new_rows, old_rows) of every item id present in both vocabularies."""
    old = dict(zip(old_items.column("item_id").to_pylist(), old_items.column("item_idx").to_pylist(), strict=True))
    new_rows, old_rows = [], []
    for item_id, idx in zip(new_items.column("item_id").to_pylist(), new_items.column("item_idx").to_pylist(), strict=True):
        if item_id in old:
            new_rows.append(idx)
            old_rows.append(old[item_id])
    return torch.tensor(new_rows, dtype=torch.long), torch.tensor(old_rows, dtype=torch.long)


def check_init_from(init_from: str, dim: int) -> None:
    """Before any Ray starts: the checkpoint is there and has this model width (else exit 2)."""
    old_dim = ckpt.read_meta(init_from).get("spec", {}).get("dim")
    if old_dim != dim:
        raise CheckpointError(
            f"--init-from {init_from}: model width {old_dim} differs from model.dim {dim}",
            "warm start needs the same model shape; drop --init-from or match model.dim",
        )


def warm_start(model: P5Rec, init_from: str, new_items: pa.Table) -> dict:
    check_init_from(init_from, model.spec.dim)
    old = ckpt.load(init_from)
    new_rows, old_rows = item_index_map(old.items, new_items)
    old_state, state = old.model.state_dict(), model.state_dict()
    copied, fresh = 0, []
    with torch.no_grad():
        for key, value in state.items():
            if key not in old_state or ".values_" in key:  # feature values come from the new data
                fresh.append(key)
            elif key == ITEM_ROWS and len(new_rows):
                value[new_rows] = old_state[key][old_rows].to(value.dtype)
                copied += 1
            elif old_state[key].shape == value.shape:
                value.copy_(old_state[key])
                copied += 1
            else:
                fresh.append(key)
    model.load_state_dict(state)
    log.info("warm start from %s: %d tensors copied, %d known items, %d fresh tensors", init_from, copied, len(new_rows), len(fresh))
    return {"copied": copied, "known_items": len(new_rows), "fresh": fresh}
