"""Ray Serve: one deployment per task, and the Recommender ingress over HTTP and gRPC.

    Recommender   ingress: FastAPI routes + p5ray.v1 gRPC methods, one core method per task
      ├── Recall      top-k over the whole catalog, seen items excluded (@serve.batch)
      ├── Rank        a candidate list sorted by click / purchase probability
      ├── CrossSell   items to sell with given items
      └── Rating      the rating a user would give an item

`build_app(AppArgs)` binds the ingress to the task deployments it is given: all four make the
combined application "p5ray" (`/v1/recommend` = recall -> rank -> cross-sell); one makes a
per-task application ("recall", "rank", "cross_sell", "rating"). Task deployments load the
checkpoint named in their user_config, `{"checkpoint": PATH}`; a new path swaps the weights in
place (reconfigure, no replica restart), and every answer names its `model_version`.

`/v1/recommend` runs one of two pipelines (`AppArgs.pipeline`):
  fused     (default) one call to Recall, which runs recall -> rank -> cross-sell for a batch of
            users in one pass of the shared encoder (Recommender.recommend_many): one hop
  composed  the ingress calls Recall, Rank and CrossSell in turn over their handles: three hops
            and the user encoded twice, but each stage scales (and could be replaced) on its own
"""

import asyncio
import logging
import os
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from p5ray import faults
from p5ray.adapters import answer_grpc, make_api, to_domain
from p5ray.errors import NotFoundError, P5RayError
from p5ray.health import HEALTH, RequestClock, timed
from p5ray.proto import p5ray_pb2 as pb
from p5ray.schemas import (
    CANDIDATES,
    CrossSellRequest,
    ItemsResponse,
    RankRequest,
    RatingRequest,
    RatingResponse,
    RecallRequest,
    RecommendRequest,
    RecommendResponse,
    scored,
)
from p5ray.tasks import BY_NAME, TASK_NAMES

log = logging.getLogger(__name__)

COMBINED = "p5ray"
TaskName = Literal["recall", "rank", "cross_sell", "rating"]


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of an application in serve/config.yaml)."""

    checkpoint: str = Field(description="checkpoint directory (printed by `p5ray train`)")
    tasks: list[TaskName] = Field(default_factory=lambda: list(TASK_NAMES), min_length=1)
    replicas: int | None = Field(None, ge=1, description="fixed replicas per task deployment (default: 1, or the config's autoscaling)")
    replica_cpus: float = Field(0.5, ge=0, description="logical CPUs reserved per task replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per task replica (fractions share one GPU); "
                                "a replica given a GPU holds the model there")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per task replica")
    pipeline: Literal["fused", "composed"] = Field(
        "fused", description="/v1/recommend: fused = one batched call to Recall running recall -> rank -> "
        "cross-sell in one encoder pass; composed = Recall, Rank, CrossSell called in turn over handles")
    recall_max_batch_size: int = Field(8, ge=1, description="@serve.batch size of Recall's recall and "
                                       "fused recommend (1: off)")
    recall_batch_wait_s: float = Field(0.002, ge=0)
    share_from: str | None = Field(
        None,
        description="serve these tasks through the task deployments of this (combined) application "
        "instead of loading the model again: a per-task app then adds only its ingress",
    )
    stall_timeout_s: float = Field(60.0, gt=0, description="a task replica with requests in flight and none "
                                   "finished for this long fails its health check and is replaced")


# -- task deployments ---------------------------------------------------------------------------


class TaskModel:
    """Base of the task deployments: the serving core, loaded from user_config and swapped whole."""

    def __init__(self, torch_threads: int = 1, stall_timeout_s: float = 60.0):
        import torch

        torch.set_num_threads(torch_threads)
        self.core = None
        self.clock = RequestClock(stall_timeout_s)

    async def reconfigure(self, config: dict) -> None:
        from p5ray.inference import Recommender as Core

        core = await asyncio.to_thread(Core, config["checkpoint"], replica_device())  # old weights keep answering
        self.core = core
        log.info("%s serves model %s from %s", type(self).__name__, core.model_version, core.path)

    def check_health(self) -> None:
        if self.core is None:
            raise RuntimeError("no model loaded")
        stalled = self.clock.stalled_for()
        if stalled > self.clock.stall_timeout_s:
            raise RuntimeError(f"stalled: {self.clock.in_flight} request(s) in flight, none finished for {stalled:.0f} s")

    def version(self) -> str:
        return self.core.model_version


def replica_device() -> str:
    """"cuda" in a replica Ray gave a GPU (ray_actor_options num_gpus), else "cpu"."""
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def items_response(core, answer) -> ItemsResponse:
    return ItemsResponse(items=scored(answer.items), cold_start=answer.cold_start, ignored=answer.ignored, model_version=core.model_version)


def answer_all(many, one, respond, requests: list) -> list:
    """One batch through `many`; if the core refuses it, each request through `one`, so a bad
    request fails alone (its error is returned in its place)."""
    faults.stall_point("Recall")  # test-only; inert unless P5RAY_FAULT is set
    try:
        return [respond(a) for a in many([(r.user_id, r.history, r.k) for r in requests])]
    except P5RayError:
        out = []
        for r in requests:
            try:
                out.append(respond(one(r.user_id, r.history, r.k)))
            except P5RayError as exc:
                out.append(exc)
        return out


def recall_all(core, requests: list[RecallRequest]) -> list:
    return answer_all(core.recall_many, core.recall, lambda a: items_response(core, a), requests)


def recommend_all(core, requests: list[RecommendRequest]) -> list:
    def respond(r):
        return RecommendResponse(items=scored(r.items), cross_sell=scored(r.cross_sell), cold_start=r.cold_start,
                                 ignored=r.ignored, model_version=r.model_version)

    return answer_all(core.recommend_many, core.recommend, respond, requests)


def unbatched(answer):
    if isinstance(answer, Exception):
        raise answer
    return answer


@serve.deployment(name="Recall", max_ongoing_requests=16, max_queued_requests=64, **HEALTH)
class Recall(TaskModel):
    def __init__(self, torch_threads: int = 1, stall_timeout_s: float = 60.0, max_batch_size: int = 8,
                 batch_wait_s: float = 0.002):
        super().__init__(torch_threads, stall_timeout_s)
        for batched in (self.recall_batch, self.recommend_batch):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_s)

    @timed
    async def recall(self, request: RecallRequest) -> ItemsResponse:
        return unbatched(await self.recall_batch(request))

    @timed
    async def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """The fused /v1/recommend: recall -> rank -> cross-sell here, batched across requests."""
        return unbatched(await self.recommend_batch(request))

    # The batches compute on the event loop, not in a worker thread: a batch is milliseconds of
    # torch, requests arriving meanwhile queue for the next batch, and the hand-off to a thread
    # measured slower (recommend at 4 clients over gRPC: 148 -> 182 req/s inline; BENCHMARKS.md).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def recall_batch(self, requests: list[RecallRequest]) -> list:
        return recall_all(self.core, requests)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def recommend_batch(self, requests: list[RecommendRequest]) -> list:
        return recommend_all(self.core, requests)


@serve.deployment(name="Rank", max_ongoing_requests=8, max_queued_requests=64, **HEALTH)
class Rank(TaskModel):
    @timed
    def rank(self, request: RankRequest) -> ItemsResponse:
        core = self.core
        return items_response(core, core.rank(request.user_id, request.history, request.candidates))


@serve.deployment(name="CrossSell", max_ongoing_requests=8, max_queued_requests=64, **HEALTH)
class CrossSell(TaskModel):
    @timed
    def cross_sell(self, request: CrossSellRequest) -> ItemsResponse:
        core = self.core
        return items_response(core, core.cross_sell(request.item_ids, request.k))

    @timed
    def cross_sell_after(self, user_id: str, history: list[str], items: list[str], k: int) -> ItemsResponse:
        core = self.core
        return items_response(core, core.cross_sell_after(user_id, history, items, k))


@serve.deployment(name="Rating", max_ongoing_requests=8, max_queued_requests=64, **HEALTH)
class Rating(TaskModel):
    @timed
    def rating(self, request: RatingRequest) -> RatingResponse:
        core = self.core
        value = core.rating(request.user_id, request.item_id, request.history)
        return RatingResponse(rating=value, model_version=core.model_version)


TASK_DEPLOYMENTS = {"recall": Recall, "rank": Rank, "cross_sell": CrossSell, "rating": Rating}

# -- the ingress --------------------------------------------------------------------------------

async def call_task(method, *args):
    """One call of a task deployment, made once more if the replica died while answering it.

    Serve routes the second call to a live replica. Every task call is a read, so repeating it
    is safe; a second failure reaches the client as 503 / UNAVAILABLE (adapters.to_domain).
    """
    try:
        return await method.remote(*args)
    except RayActorError as exc:  # the replica process died or is unreachable, not a bad request
        log.warning("a %s replica failed (%s); retrying on another", method.deployment_name, type(exc).__name__)
        return await method.remote(*args)


async def _unless_untrained(response):
    """A sub-answer, or None when the model was not trained for that task (skip the step)."""
    try:
        return await response
    except Exception as exc:
        if isinstance(to_domain(exc), NotFoundError):
            return None
        raise


api = make_api("p5ray")
ERRORS = {code: {"description": text} for code, text in (
    (404, "a task this application or model does not serve"),
    (413, "request body over the size limit"),
    (422, "invalid request"),
    (503, "overloaded; retry with backoff"),
)}


@serve.deployment(name="Recommender", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Recommender:
    """HTTP routes and gRPC methods: two thin adapters over one async core method per task."""

    def __init__(self, recall: DeploymentHandle | None = None, rank: DeploymentHandle | None = None,
                 cross_sell: DeploymentHandle | None = None, rating: DeploymentHandle | None = None,
                 shared: tuple[str, list[str]] | None = None, pipeline: str = "fused"):
        self.pipeline = pipeline
        given = {"recall": recall, "rank": rank, "cross_sell": cross_sell, "rating": rating}
        self.handles = {task: h for task, h in given.items() if h is not None}
        if shared:  # (application, tasks): call that application's task deployments
            app, tasks = shared
            for task in tasks:
                self.handles[task] = serve.get_deployment_handle(TASK_DEPLOYMENTS[task].name, app_name=app)
        self.combined = len(self.handles) == len(TASK_NAMES)
        self.app_name = COMBINED if self.combined else "+".join(self.handles)

    def _handle(self, task: str) -> DeploymentHandle:
        if task not in self.handles:
            raise NotFoundError(
                f"application {self.app_name!r} does not serve {task}",
                f"use application {COMBINED!r}: HTTP /v1/{BY_NAME[task].route if task in BY_NAME else task}, gRPC metadata application={COMBINED}",
            )
        return self.handles[task]

    # -- core methods ---------------------------------------------------------------------------
    async def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """recall (max(k, 100)) -> rank -> top k -> cross-sell: the answer of inference.recommend."""
        if not self.combined:
            self._handle("recommend")
        if self.pipeline == "fused":
            return await call_task(self.handles["recall"].recommend, request)
        user, history, k = request.user_id, request.history, request.k
        recalled = await call_task(self.handles["recall"].recall, RecallRequest(user_id=user, history=history, k=max(k, CANDIDATES)))
        items, version = recalled.items, recalled.model_version
        if items and not recalled.cold_start:
            ranked = await _unless_untrained(call_task(self.handles["rank"].rank, RankRequest(user_id=user, history=history, candidates=[i.item_id for i in items])))
            if ranked is not None:
                items, version = ranked.items, ranked.model_version
        items = items[:k]
        cross = None
        if items:
            cross = await _unless_untrained(call_task(self.handles["cross_sell"].cross_sell_after, user, history, [i.item_id for i in items], k))
        return RecommendResponse(items=items, cross_sell=cross.items if cross else [], cold_start=recalled.cold_start,
                                 ignored=recalled.ignored, model_version=version)

    async def recall(self, request: RecallRequest) -> ItemsResponse:
        return await call_task(self._handle("recall").recall, request)

    async def rank(self, request: RankRequest) -> ItemsResponse:
        return await call_task(self._handle("rank").rank, request)

    async def cross_sell(self, request: CrossSellRequest) -> ItemsResponse:
        return await call_task(self._handle("cross_sell").cross_sell, request)

    async def rating(self, request: RatingRequest) -> RatingResponse:
        return await call_task(self._handle("rating").rating, request)

    async def health(self) -> dict:
        versions = await asyncio.wait_for(asyncio.gather(*(h.version.remote() for h in self.handles.values())), timeout=10)
        return {"status": "ok", "application": self.app_name, "model_version": dict(zip(self.handles, versions, strict=True))}

    # -- HTTP -----------------------------------------------------------------------------------
    @api.post("/v1/recommend", responses=ERRORS)
    async def post_recommend(self, body: RecommendRequest) -> RecommendResponse:
        return await self.recommend(body)

    @api.post("/v1/recall", responses=ERRORS)
    async def post_recall(self, body: RecallRequest) -> ItemsResponse:
        return await self.recall(body)

    @api.post("/v1/rank", responses=ERRORS)
    async def post_rank(self, body: RankRequest) -> ItemsResponse:
        return await self.rank(body)

    @api.post("/v1/cross-sell", responses=ERRORS)
    async def post_cross_sell(self, body: CrossSellRequest) -> ItemsResponse:
        return await self.cross_sell(body)

    @api.post("/v1/rating", responses=ERRORS)
    async def post_rating(self, body: RatingRequest) -> RatingResponse:
        return await self.rating(body)

    @api.get("/healthz")
    async def healthz(self):
        try:
            return await self.health()
        except Exception as exc:  # any deployment that cannot answer makes the app unhealthy
            error = to_domain(exc)
            detail = error.one_line() if error else f"not ready: {type(exc).__name__}"
            return JSONResponse({"detail": detail}, status_code=503)

    # -- gRPC (p5ray.v1.Recommender; method names are the RPC names) -----------------------------
    async def Recommend(self, request: pb.RecommendRequest, grpc_context) -> pb.RecommendResponse:
        return await answer_grpc(self.recommend, RecommendRequest, request, pb.RecommendResponse, grpc_context)

    async def Recall(self, request: pb.RecallRequest, grpc_context) -> pb.ItemsResponse:
        return await answer_grpc(self.recall, RecallRequest, request, pb.ItemsResponse, grpc_context)

    async def Rank(self, request: pb.RankRequest, grpc_context) -> pb.ItemsResponse:
        return await answer_grpc(self.rank, RankRequest, request, pb.ItemsResponse, grpc_context)

    async def CrossSell(self, request: pb.CrossSellRequest, grpc_context) -> pb.ItemsResponse:
        return await answer_grpc(self.cross_sell, CrossSellRequest, request, pb.ItemsResponse, grpc_context)

    async def PredictRating(self, request: pb.RatingRequest, grpc_context) -> pb.RatingResponse:
        return await answer_grpc(self.rating, RatingRequest, request, pb.RatingResponse, grpc_context)


# -- application builders -----------------------------------------------------------------------


def build_app(args: AppArgs):
    """The Serve application for `args.tasks` (typed builder: serve/config.yaml `args:`)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    from p5ray.checkpoint import read_meta  # here: the ingress replicas never import torch

    checkpoint = os.path.abspath(args.checkpoint)
    read_meta(checkpoint)  # fail at deploy time with one clear line, not in every replica
    if args.share_from:
        return Recommender.bind(shared=(args.share_from, list(dict.fromkeys(args.tasks))), pipeline=args.pipeline)
    bound = {}
    for task in dict.fromkeys(args.tasks):
        kwargs = {"torch_threads": args.torch_threads, "stall_timeout_s": args.stall_timeout_s}
        if task == "recall":
            kwargs.update(max_batch_size=args.recall_max_batch_size, batch_wait_s=args.recall_batch_wait_s)
        actor = {"num_cpus": args.replica_cpus}
        if args.replica_gpus:
            actor["num_gpus"] = args.replica_gpus
        options = {"user_config": {"checkpoint": checkpoint}, "ray_actor_options": actor}
        if args.replicas:
            options["num_replicas"] = args.replicas
        bound[task] = TASK_DEPLOYMENTS[task].options(**options).bind(**kwargs)
    return Recommender.bind(**bound, pipeline=args.pipeline)
