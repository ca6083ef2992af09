"""The main job end to end, as `make quickstart` runs it: prepare -> train (Ray Train, 2 workers)
-> evaluate -> serve (Ray Serve) -> a real HTTP and gRPC request for a real user -> shutdown."""

import json

import pytest

from tests.helpers import DATA, TINY, last_line, run_cli

pytestmark = pytest.mark.slow


def test_quickstart_on_a_slice_of_movielens(tmp_path):
    src = tmp_path / "ml"
    src.mkdir()
    keep = {str(u) for u in range(1, 121)}
    with open(DATA / "ml-100k" / "u.data") as f, open(src / "u.data", "w") as out:
        out.writelines(line for line in f if line.split("\t", 1)[0] in keep)
    for name in ("u.item", "u.user"):
        (src / name).write_bytes((DATA / "ml-100k" / name).read_bytes())
    seen = {line.split("\t")[1] for line in open(src / "u.data") if line.startswith("7\t")}

    out = run_cli("quickstart", "--workdir", str(tmp_path / "work"), "--input", str(src / "u.data"),
                  "--config", str(TINY), "--set", "train.epochs=2", "--user", "7", timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    metrics = json.loads(next(ln for ln in lines if ln.startswith("{")))
    assert metrics["n_users"] == 120 and 0 <= metrics["full/ndcg@10"] <= 1
    table = lines[lines.index(next(ln for ln in lines if ln.startswith("user 7"))) + 2:][:10]
    items = [row.split()[1] for row in table]
    assert len(items) == 10 and not set(items) & seen, "served items must exclude the user's history"
    grpc_line = last_line(out.stdout, "gRPC Recommend: ")
    assert grpc_line and grpc_line.split(" (")[0] == items[0], "gRPC and HTTP must agree on the top item"
    assert (tmp_path / "work" / "data" / "manifest.json").is_file()
    assert last_line(out.stdout, "checkpoint: ")
