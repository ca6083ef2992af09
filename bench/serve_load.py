"""Serving load bench: Ray Serve (HTTP and gRPC) against a bare FastAPI + uvicorn server.

    python bench/serve_load.py                          # synthetic Beauty-shaped model, 10 s a run
    python bench/serve_load.py --checkpoint CKPT --duration 20 --out bench/serve_load.json

Serve's /v1/recommend runs both pipelines of p5ray/serve.py side by side: "serve" is the default
fused one (one batched call to Recall), "composed" the three handle calls (Recall, Rank, CrossSell).
Both servers host the same model through the same core (`p5ray.inference.Recommender`) and the
same request schemas; the bare server is what a team would otherwise write: one uvicorn process,
sync FastAPI routes calling the core. The load generator is closed-loop asyncio on loopback: C
concurrent clients, each sending its next request when the last one answered, for a fixed
duration; it reports throughput and p50/p95/p99 latency, and every non-200 / non-OK as an error.

`--catalog` instead times the recall core alone on growing synthetic catalogs (12k .. 1M items)
beside the bare matrix-product + top-k it cannot avoid, to show serving adds no per-item cost.
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEAUTY = {"items": 12101, "users": 22363}  # Amazon Beauty after 5-core filtering (data/amazon-beauty)
ROUTES = ("recommend", "recall", "rank", "cross-sell", "rating")


# -- a model of the right shape ------------------------------------------------------------------


def synthetic_checkpoint(path: Path, items: int, users: int, history: int = 8, seed: int = 0) -> Path:
    """Random weights in the real format, with the default model config (dim 64, 2 layers, window 50)."""
    import pyarrow as pa
    import torch

    from p5ray import checkpoint as ckpt
    from p5ray.config import Config
    from p5ray.train import build_model, build_spec

    rng = np.random.default_rng(seed)
    cfg = Config()
    spec = build_spec(cfg, {"items": items, "users": users, "has_ratings": True}, rating_mean=4.0)
    idx = np.arange(1, items + 1, dtype=np.int32)
    item_table = pa.table({"item_idx": idx, "item_id": [f"i{i}" for i in idx],
                           "train_count": pa.array(rng.zipf(1.5, items).clip(max=10**6), pa.int64())})
    user_table = pa.table({"user_idx": pa.array(np.arange(1, users + 1), pa.int32()),
                           "user_id": [f"u{u}" for u in range(1, users + 1)],
                           "history": pa.array([rng.integers(1, items + 1, history).tolist() for _ in range(users)], pa.list_(pa.int32()))})
    torch.manual_seed(seed)
    model = build_model(spec, item_table, user_table)
    meta = {"tasks": list(spec.tasks), "has_ratings": True, "rating_min": 1.0, "rating_max": 5.0,
            "model_version": f"synthetic-{items}"}
    return ckpt.save(path, model, cfg, item_table, user_table, meta)


# -- servers ---------------------------------------------------------------------------------------


def bare_app(checkpoint: str):
    """The baseline: one process, FastAPI, the core called directly by sync routes."""
    from p5ray.adapters import make_api
    from p5ray.inference import Recommender
    from p5ray.schemas import (
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

    core = Recommender(checkpoint)
    api = make_api("bare")

    def items(answer) -> ItemsResponse:
        return ItemsResponse(items=scored(answer.items), cold_start=answer.cold_start, ignored=answer.ignored, model_version=core.model_version)

    @api.post("/v1/recommend")
    def recommend(body: RecommendRequest) -> RecommendResponse:
        r = core.recommend(body.user_id, body.history, body.k)
        return RecommendResponse(items=scored(r.items), cross_sell=scored(r.cross_sell), cold_start=r.cold_start, ignored=r.ignored, model_version=r.model_version)

    @api.post("/v1/recall")
    def recall(body: RecallRequest) -> ItemsResponse:
        return items(core.recall(body.user_id, body.history, body.k))

    @api.post("/v1/rank")
    def rank(body: RankRequest) -> ItemsResponse:
        return items(core.rank(body.user_id, body.history, body.candidates))

    @api.post("/v1/cross-sell")
    def cross_sell(body: CrossSellRequest) -> ItemsResponse:
        return items(core.cross_sell(body.item_ids, body.k))

    @api.post("/v1/rating")
    def rating(body: RatingRequest) -> RatingResponse:
        return RatingResponse(rating=core.rating(body.user_id, body.item_id, body.history), model_version=core.model_version)

    @api.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 600, process: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout_s} s")


def start_bare(checkpoint: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--bare-server", checkpoint, "--port", str(port)],
                               stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url, process=process)
    return process, url


def start_serve(checkpoint: str, batch: int) -> tuple[str, str]:
    from p5ray import server
    from p5ray.raycluster import ensure_ray

    ensure_ray(8)
    http_port, grpc_port = free_port(), free_port()
    config = server.serve_config(checkpoint, "127.0.0.1", http_port, grpc_port)
    config["applications"] = config["applications"][:1]  # the combined app: every route (fused recommend)
    config["applications"][0]["args"]["recall_max_batch_size"] = batch
    # the same app as an ingress over those replicas with the composed /v1/recommend (3 handle calls)
    config["applications"].append({"name": "composed", "route_prefix": "/composed", "import_path": server.BUILDER,
                                   "args": {"checkpoint": checkpoint, "share_from": "p5ray", "pipeline": "composed"}})
    server.start_serve(config)
    server.deploy(config, timeout_s=600)
    url = f"http://127.0.0.1:{http_port}"
    wait_http(url)
    return url, f"127.0.0.1:{grpc_port}"


# -- load ------------------------------------------------------------------------------------------


def make_request(route: str, rng: np.random.Generator, items: int, users: int) -> dict:
    user = f"u{rng.integers(1, users + 1)}"
    item = lambda: f"i{rng.integers(1, items + 1)}"  # noqa: E731
    return {
        "recommend": {"user_id": user, "k": 10},
        "recall": {"user_id": user, "k": 10},
        "rank": {"user_id": user, "candidates": [item() for _ in range(50)]},
        "cross-sell": {"item_ids": [item()], "k": 10},
        "rating": {"user_id": user, "item_id": item()},
    }[route]


async def http_load(url: str, route: str, concurrency: int, duration: float, shape: dict, app: str = "p5ray") -> dict:
    import httpx

    latencies, errors = [], 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def worker(seed: int):
            nonlocal errors
            rng = np.random.default_rng(seed)
            while time.perf_counter() < stop:
                body = make_request(route, rng, **shape)
                t = time.perf_counter()
                try:
                    ok = (await client.post(f"/v1/{route}", json=body)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t) if ok else None
                errors += not ok

        first = await client.post(f"/v1/{route}", json=make_request(route, np.random.default_rng(), **shape))
        if first.status_code != 200:
            raise RuntimeError(f"{url}/v1/{route} answered {first.status_code}: {first.text[:200]}")
        stop = time.perf_counter() + duration
        await asyncio.gather(*(worker(s) for s in range(concurrency)))
    return summary(latencies, errors, duration)


async def grpc_load(target: str, route: str, concurrency: int, duration: float, shape: dict, app: str = "p5ray") -> dict:
    import grpc

    from p5ray.proto import p5ray_pb2 as pb
    from p5ray.proto import p5ray_pb2_grpc

    rpc = {"recommend": ("Recommend", pb.RecommendRequest), "recall": ("Recall", pb.RecallRequest), "rank": ("Rank", pb.RankRequest),
           "cross-sell": ("CrossSell", pb.CrossSellRequest), "rating": ("PredictRating", pb.RatingRequest)}[route]
    latencies, errors = [], 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = getattr(p5ray_pb2_grpc.RecommenderStub(channel), rpc[0])

        async def worker(seed: int):
            nonlocal errors
            rng = np.random.default_rng(seed)
            while time.perf_counter() < stop:
                message = rpc[1](**make_request(route, rng, **shape))
                t = time.perf_counter()
                try:
                    await call(message, metadata=(("application", app),), timeout=30)
                    latencies.append(time.perf_counter() - t)
                except grpc.aio.AioRpcError:
                    errors += 1

        stop = time.perf_counter() + duration
        await asyncio.gather(*(worker(s) for s in range(concurrency)))
    return summary(latencies, errors, duration)


def summary(latencies: list[float], errors: int, duration: float) -> dict:
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {"rps": round(len(latencies) / duration, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "ok": len(latencies), "errors": errors}


# -- catalog scaling (core only) --------------------------------------------------------------------


def catalog_scaling(sizes: list[int], repeats: int = 30) -> list[dict]:
    import torch

    from p5ray.inference import Recommender

    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            core = Recommender(str(synthetic_checkpoint(Path(tmp) / "c", items=n, users=1000)))
        core.recall("u1", None, 10)
        t = time.perf_counter()
        for u in range(repeats):
            core.recall(f"u{u + 1}", None, 10)
        recall_ms = (time.perf_counter() - t) / repeats * 1000
        query = torch.randn(1, core.table.shape[1])
        t = time.perf_counter()
        for _ in range(repeats):
            (query @ core.table.T).topk(10)
        scan_ms = (time.perf_counter() - t) / repeats * 1000
        rows.append({"items": n, "recall_ms": round(recall_ms, 2), "scan_topk_ms": round(scan_ms, 2),
                     "overhead_ms": round(recall_ms - scan_ms, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(report: dict) -> str:
    """The results as a Markdown table: one row per (route, concurrency), servers side by side."""
    rows = {}
    for r in report["results"]:
        rows.setdefault((r["route"], r["concurrency"]), {})[f"{r['server']} {r['protocol']}"] = r
    servers = ("bare http", "serve http", "serve grpc") + tuple(
        t for t in ("composed http", "composed grpc") if any(f"{r['server']} {r['protocol']}" == t for r in report["results"]))
    head = ["route", "clients"] + [f"{t} {m}" for t in servers for m in ("req/s", "p50/p95/p99 ms")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (route, c), by in rows.items():
        cells = [f"/v1/{route}", str(c)]
        for t in servers:
            r = by.get(t)
            cells += [f"{r['rps']:.1f}", f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f}" + (f" ({r['errors']} err)" if r["errors"] else "")] if r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "/v1/recommend throughput at p99 <= 50 ms (the best cell of each server; ratio to bare):", ""]
    best = capacity(report["results"])
    for name, rps in best.items():
        ratio = f"{rps / best['bare http']:.2f}x" if best.get("bare http") else "-"
        lines.append(f"- {name}: {rps:.1f} req/s ({ratio})")
    return "\n".join(lines)


def capacity(results: list[dict], route: str = "recommend", p99_ms: float = 50.0) -> dict[str, float]:
    """Per server: the highest throughput among its cells on `route` whose p99 is within `p99_ms`
    (0 when none is)."""
    best: dict[str, float] = {}
    for r in results:
        if r["route"] == route:
            name = f"{r['server']} {r['protocol']}"
            ok = r["p99_ms"] <= p99_ms and not r["errors"]
            best[name] = max(best.get(name, 0.0), r["rps"] if ok else 0.0)
    return best


# -- driver ------------------------------------------------------------------------------------------


def run_all(args) -> dict:
    """Both servers up at once; each (route, concurrency) runs bare, Serve HTTP, Serve gRPC back to
    back, so a change in background load hits all three alike."""
    shape = {"items": BEAUTY["items"], "users": BEAUTY["users"]}
    checkpoint, tasks = args.checkpoint, ["recall", "rank", "cross_sell", "rating"]
    if checkpoint:
        from p5ray.checkpoint import read_meta

        meta = read_meta(checkpoint)
        shape = {"items": meta["spec"]["num_items"], "users": meta["spec"]["num_users"]}
        tasks = meta["spec"]["tasks"]
    else:
        checkpoint = str(synthetic_checkpoint(Path(tempfile.mkdtemp(prefix="p5ray-bench-")) / "beauty", **shape))
    routes = [r for r in args.routes if r == "recommend" or r.replace("-", "_") in tasks]
    plan = [(r, c) for r in routes for c in (args.concurrency if r == "recommend" else [args.task_concurrency])]
    results = []
    bare, bare_url = start_bare(checkpoint)
    try:
        url, target = start_serve(checkpoint, args.batch)
        targets = (("bare", "http", http_load, bare_url, "p5ray"), ("serve", "http", http_load, url, "p5ray"),
                   ("serve", "grpc", grpc_load, target, "p5ray"),
                   ("composed", "http", http_load, f"{url}/composed", "composed"), ("composed", "grpc", grpc_load, target, "composed"))
        for route, c in plan:
            for server, protocol, load, address, app in targets:
                if server == "composed" and (route != "recommend" or args.no_composed):
                    continue  # the pipelines differ only in /v1/recommend
                numbers = asyncio.run(load(address, route, c, args.duration, shape, app))
                results.append({"server": server, "protocol": protocol, "route": route, "concurrency": c, **numbers})
                print(json.dumps(results[-1]), flush=True)
    finally:
        bare.terminate()
        bare.wait()
    return {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, load average at end {os.getloadavg()[0]:.1f}",
            "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.checkpoint or f"synthetic Beauty-shaped {shape}",
            "duration_s": args.duration, "recall_batch": args.batch, "serve_env": args.serve_env, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="serve this checkpoint (default: a synthetic Beauty-shaped one)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per (server, protocol, route, concurrency)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="clients for /v1/recommend")
    parser.add_argument("--task-concurrency", type=int, default=4, help="clients for each task route")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    parser.add_argument("--batch", type=int, default=8, help="Recall @serve.batch max size (1: no batching)")
    parser.add_argument("--no-composed", action="store_true", help="skip the composed /v1/recommend pipeline")
    parser.add_argument("--serve-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment for Ray Serve's processes, e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0")
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--catalog", type=int, nargs="*", help="time recall on synthetic catalogs of these sizes instead")
    parser.add_argument("--markdown", metavar="JSON", help="print the results file JSON as a Markdown table")
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.bare_server:
        import uvicorn

        uvicorn.run(bare_app(args.bare_server), host="127.0.0.1", port=args.port, log_level="warning")
        return 0
    os.environ.update(dict(item.split("=", 1) for item in args.serve_env))  # inherited by the local Ray
    report = {"catalog": catalog_scaling(args.catalog or [12_101, 100_000, 1_000_000])} if args.catalog is not None else run_all(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
