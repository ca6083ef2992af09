"""The serving wire formats: pydantic models (HTTP bodies, OpenAPI) and their gRPC twins.

Every request, whichever door it came in by, becomes one of the request models below, so the
limits are written once: ids are 1..256 characters, `k` is an integer 1..1000 (10 when left out),
`history` holds at most 10,000 ids (longer is a 422, not a truncation), `candidates` 1..10,000.
The gRPC messages of `p5ray.v1` (serve/p5ray.proto) are converted by `from_proto` / `to_proto`.
"""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_CANDIDATES = 10_000
MAX_ID_CHARS = 256
CANDIDATES = 100  # recall depth of /v1/recommend before rank: max(k, CANDIDATES)

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]  # a user or item id
K = Annotated[int, Field(strict=True, ge=1, le=MAX_K, description=f"how many items, 1..{MAX_K}")]
History = Annotated[
    list[Id],
    Field(max_length=MAX_HISTORY, description="item ids, oldest first; only the most recent model-window items are encoded"),
]


class Request(BaseModel):
    model_config = ConfigDict(frozen=True)


class RecommendRequest(Request):
    user_id: Id
    history: History = []
    k: K = 10


class RecallRequest(Request):
    user_id: Id | None = None
    history: History = []
    k: K = 10


class RankRequest(Request):
    user_id: Id | None = None
    history: History = []
    candidates: Annotated[list[Id], Field(min_length=1, max_length=MAX_CANDIDATES)]


class CrossSellRequest(Request):
    item_ids: Annotated[list[Id], Field(min_length=1, max_length=MAX_HISTORY)]
    k: K = 10


class RatingRequest(Request):
    user_id: Id
    item_id: Id
    history: History = []


class ScoredItem(BaseModel):
    item_id: str
    score: float


class ItemsResponse(BaseModel):
    items: list[ScoredItem]
    cold_start: bool = False
    ignored: list[str] = []
    model_version: str


class RecommendResponse(ItemsResponse):
    cross_sell: list[ScoredItem] = []


class RatingResponse(BaseModel):
    rating: float
    model_version: str


def scored(items: list[tuple[str, float]]) -> list[ScoredItem]:
    return [ScoredItem(item_id=i, score=s) for i, s in items]


# -- gRPC (p5ray.v1) -----------------------------------------------------------------------


def _optional(message, name: str):
    """proto3 `optional` field: None when unset, so pydantic applies the HTTP default."""
    return getattr(message, name) if message.HasField(name) else None


def _drop_none(**fields) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def from_proto(model: type[Request], message) -> Request:
    """A p5ray.v1 request message -> the request model (validated: raises ValidationError)."""
    fields = {}
    for name in model.model_fields:
        if name == "k":
            fields[name] = _optional(message, "k")
        elif name in ("history", "candidates", "item_ids"):
            fields[name] = list(getattr(message, name))
        else:  # proto3 strings: "" means unset
            fields[name] = getattr(message, name) or None
    return model.model_validate(_drop_none(**fields))


def to_proto(answer: BaseModel, message_cls):
    """A response model -> its p5ray.v1 message (same field names)."""
    return message_cls(**answer.model_dump())
