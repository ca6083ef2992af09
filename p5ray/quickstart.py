"""`p5ray quickstart`: the whole main job on the bundled MovieLens-100K, on an embedded local Ray.

prepare -> train (Ray Train, 2 workers) -> evaluate -> serve (Ray Serve, HTTP + gRPC) -> one real
request over each protocol, printed -> clean shutdown. Every stage is the one the verbs run.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

from p5ray.errors import UserError

log = logging.getLogger(__name__)
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "ml-100k" / "u.data"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stage(name: str) -> float:
    log.info("── %s", name)
    return time.perf_counter()


def run(workdir: str = ".quickstart", input_path: str | None = None, config_path: str | None = None,
        overrides: list[str] | None = None, user: str = "196") -> int:
    from p5ray import evaluate, prepare, train
    from p5ray.config import load_config

    source = Path(input_path) if input_path else BUNDLED
    if not source.is_file():
        raise UserError(f"{source} does not exist", "run from a p5ray checkout, or pass --input")
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config_path, overrides)

    t0 = _stage(f"1/5 prepare {source}")
    data = work / "data"
    manifest = prepare.run(prepare.PrepareOptions(input=str(source), out=str(data), overwrite=True))
    log.info("%d users, %d items, %d interactions (%.0f s)", manifest["users"], manifest["items"],
             manifest["interactions"], time.perf_counter() - t0)

    t0 = _stage(f"2/5 train on {cfg.train.num_workers} Ray Train workers")
    result = train.fit(str(data), cfg, storage=str(work / "runs"), name=time.strftime("quickstart-%Y%m%d-%H%M%S"))
    log.info("best valid/ndcg@10 %.4f at epoch %s (%.0f s)", result.metrics.get("valid/ndcg@10", float("nan")),
             result.metrics.get("epoch"), time.perf_counter() - t0)

    _stage("3/5 evaluate on the test split")
    metrics = evaluate.run(result.checkpoint, str(data))
    print(json.dumps(metrics))
    ratio = metrics["full/ndcg@10"] / max(metrics["baseline/popularity/full/ndcg@10"], 1e-12)
    print(f"full/ndcg@10 {metrics['full/ndcg@10']:.4f} vs popularity "
          f"{metrics['baseline/popularity/full/ndcg@10']:.4f} ({ratio:.2f}x)")

    serve_and_ask(result.checkpoint, user)
    print(f"checkpoint: {result.checkpoint}")
    return 0


def serve_and_ask(checkpoint: str, user: str) -> None:
    """Start Serve on free loopback ports, ask over HTTP and gRPC, print, shut down."""
    import threading

    import ray
    from ray import serve

    from p5ray import server

    host, http_port, grpc_port = "127.0.0.1", free_port(), free_port()
    config = server.serve_config(checkpoint, host, http_port, grpc_port)
    _stage(f"4/5 serve on http://{host}:{http_port} and gRPC {host}:{grpc_port}")
    try:
        server.start_serve(config)
        server.deploy(config)
        url = f"http://{host}:{http_port}"
        server.wait_healthy(url, 300, threading.Event())
        _stage(f"5/5 ask for user {user}")
        answer = server.post(f"{url}/v1/recommend", {"user_id": user, "k": 10})
        print(f"POST {url}/v1/recommend {json.dumps({'user_id': user, 'k': 10})}")
        print(server.format_table(answer, user))
        print(f"gRPC Recommend: {grpc_recommend(host, grpc_port, user)}")
    finally:
        serve.shutdown()
        ray.shutdown()


def grpc_recommend(host: str, port: int, user: str) -> str:
    import grpc

    from p5ray.proto import p5ray_pb2, p5ray_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = p5ray_pb2_grpc.RecommenderStub(channel)
        reply = stub.Recommend(p5ray_pb2.RecommendRequest(user_id=user, k=5),
                               metadata=(("application", "p5ray"),), timeout=60)
    return ", ".join(f"{i.item_id} ({i.score:.3f})" for i in reply.items)
