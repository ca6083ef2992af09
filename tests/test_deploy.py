"""Deployment material: cluster.yaml against Ray's own cluster config schema, the KubeRay RayJob
and RayService parsed and checked for what p5ray needs (token auth, ports, shared storage, an
entrypoint the p5ray CLI accepts, the Serve applications of serve/config.yaml)."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from p5ray.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"
APPS = {"p5ray", "recall", "rank", "cross_sell", "rating"}


# -- cluster.yaml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema_as_written_and_as_ray_up_prepares_it(cluster_config):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_config, schema)
    validate_config(prepare_config(copy.deepcopy(cluster_config)))  # what `ray up` runs first


def test_cluster_has_a_cpu_head_and_autoscaling_cpu_and_gpu_workers(cluster_config):
    types = cluster_config["available_node_types"]
    assert types[cluster_config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    cpu = [t for name, t in types.items() if name != cluster_config["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and cpu
    for group in gpu + cpu:
        assert group["min_workers"] == 0 < group["max_workers"]  # scales from zero
        assert 0 < group["idle_timeout_s"] <= 60 * cluster_config["idle_timeout_minutes"]
    assert "gpu" in gpu[0]["docker"]["worker_image"]
    assert any("cu1" in c for c in gpu[0]["worker_setup_commands"])  # the CUDA build of torch


def test_cluster_nodes_install_p5ray_and_share_token_and_storage(cluster_config):
    mounts = cluster_config["file_mounts"]
    assert mounts["~/p5ray"] == "." and mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("torch==" in c for c in cluster_config["setup_commands"])
    assert any("pip install" in c and "~/p5ray" in c for c in cluster_config["setup_commands"])
    starts = cluster_config["head_start_ray_commands"] + cluster_config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    from p5ray.raycluster import SERVE_ENV  # Serve's request path as `p5ray serve` sets it locally

    assert all(f"{k}={v}" in c for c in starts if "ray start" in c for k, v in SERVE_ENV.items())
    assert any("/mnt/shared" in c for c in cluster_config["initialization_commands"])
    assert any("/mnt/shared:/mnt/shared" in o for o in cluster_config["docker"]["run_options"])


# -- KubeRay ----------------------------------------------------------------------------------


def load(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((KUBERAY / name).read_text()))
    return doc


def pods(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.60")
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    claim = load("shared-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in pods(spec):
        (container,) = pod["containers"]
        assert container["image"].endswith("p5ray:0.1.0")
        assert {"name": "shared", "mountPath": "/mnt/shared"}.items() <= container["volumeMounts"][0].items()
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_rayjob_trains_with_the_p5ray_cli_on_shared_storage_with_gpus():
    job = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "p5ray.cli"]
    args = build_parser().parse_args(argv[3:])  # the flags exist in this p5ray
    assert args.verb == "train" and args.use_gpu
    assert args.data.startswith("/mnt/shared/") and args.storage.startswith("/mnt/shared/")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    spec = job["spec"]["rayClusterSpec"]
    check_cluster_spec(spec)
    gpus = [p["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for p in pods(spec)]
    assert "1" in gpus  # one GPU per worker pod: one Ray Train worker per GPU
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.fixture(scope="module")
def service() -> dict:
    return load("rayservice.yaml")


def test_rayservice_serves_http_8000_and_grpc_9000(service):
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    check_cluster_spec(service["spec"]["rayClusterConfig"])
    ports = {p["name"]: p["port"] for p in service["spec"]["serveService"]["spec"]["ports"]}
    assert ports == {"serve": 8000, "grpc": 9000}
    for pod in pods(service["spec"]["rayClusterConfig"]):
        exposed = {p["containerPort"] for p in pod["containers"][0]["ports"]}
        assert {8000, 9000} <= exposed
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["http_options"]["port"] == 8000 and serve["grpc_options"]["port"] == 9000
    assert serve["grpc_options"]["grpc_servicer_functions"] == [
        "p5ray.proto.p5ray_pb2_grpc.add_RecommenderServicer_to_server"
    ]


def test_rayservice_pods_start_ray_with_the_serve_settings(service):
    from p5ray.raycluster import SERVE_ENV

    for pod in pods(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e["value"] for e in pod["containers"][0].get("env", [])}
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV


def test_rayservice_runs_the_spec_applications_from_one_checkpoint(service):
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert {a["name"] for a in apps} == APPS
    assert {a["import_path"] for a in apps} == {"p5ray.serve:build_app"}
    assert len({a["args"]["checkpoint"] for a in apps}) == 1
    assert all(a["args"]["checkpoint"].startswith("/mnt/shared/runs/") for a in apps)
    tasks = {a["name"]: a["args"].get("tasks") for a in apps}
    assert tasks["p5ray"] is None and all(tasks[t] == [t] for t in APPS - {"p5ray"})


def test_rayservice_matches_serve_config_where_it_exists(service):
    """Names, routes, import path, tasks and gRPC servicer as in serve/config.yaml."""
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    cluster = yaml.safe_load(service["spec"]["serveConfigV2"])

    def shape(config):
        return {a["name"]: (a["route_prefix"], a["import_path"], (a.get("args") or {}).get("tasks"),
                            (a.get("args") or {}).get("share_from")) for a in config["applications"]}

    assert shape(cluster) == shape(local)
    assert cluster["grpc_options"]["grpc_servicer_functions"] == local["grpc_options"]["grpc_servicer_functions"]
    assert cluster["logging_config"] == local["logging_config"]


def test_docker_image_installs_torch_and_p5ray_without_local_clutter():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60" in dockerfile and "torch==2.13.0" in dockerfile
    assert "pip install --no-cache-dir -e ." in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
