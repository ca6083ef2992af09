"""The task registry: one entry per task drives data, heads, losses, metrics and endpoints.

Adding a task is one `Task` here plus its head in `model.py`, its loss in `losses.py`, its
metric in `evaluate.py` and its route in `serve.py` — each looked up by `Task.name`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str  # config / metric / app name
    route: str  # HTTP route under /v1/
    rpc: str  # gRPC method of p5ray.v1.Recommender
    needs_ratings: bool  # only trained and served when the data has ratings
    metrics: tuple[str, ...]  # the evaluate keys this task produces
    description: str


RECALL = Task(
    "recall",
    "recall",
    "Recall",
    False,
    ("full/ndcg@10", "full/hr@10", "full_unmasked/ndcg@10", "sampled/hr@10"),
    "next item over the whole catalog (dot product of the user state with item embeddings)",
)
RANK = Task(
    "rank",
    "rank",
    "Rank",
    False,
    ("rank/auc",),
    "click/purchase probability of a (history, item) pair",
)
CROSS_SELL = Task(
    "cross_sell",
    "cross-sell",
    "CrossSell",
    False,
    ("cross_sell/auc", "cross_sell/hr@10"),
    "items bought together with / right after a given item",
)
RATING = Task(
    "rating",
    "rating",
    "PredictRating",
    True,
    ("rating/rmse", "rating/mae"),
    "the rating a user would give an item (regression)",
)

TASKS: tuple[Task, ...] = (RECALL, RANK, CROSS_SELL, RATING)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
BY_NAME = {t.name: t for t in TASKS}


def active_tasks(has_ratings: bool) -> tuple[str, ...]:
    """Names of the tasks a data set supports."""
    return tuple(t.name for t in TASKS if has_ratings or not t.needs_ratings)


def get(name: str) -> Task:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)}") from None
