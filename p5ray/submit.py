"""`p5ray submit`: any verb as a Ray Job on a cluster, through the Ray Jobs SDK.

    p5ray submit --address http://HEAD:8265 -- train --data /shared/ml --storage /shared/runs

The project directory is the job's working_dir (uploaded, minus EXCLUDES and files over
MAX_FILE_MB), so the cluster runs the same p5ray as the submitter; the cluster's Python must
have p5ray's dependencies (torch, ray, ...). The entrypoint is `python -m p5ray.jobentry VERB ...`,
which marks the verb's stdout lines; the log stream is split back into stdout (the verb's results,
e.g. `checkpoint: PATH`) and stderr (logs, Ray's own lines). Job id and final status go to stderr.

Token authentication (Ray's default): the token comes from RAY_AUTH_TOKEN, the file named by
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, and is sent as `Authorization: Bearer ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from p5ray.errors import ClusterError, UserError

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # Ray's default dashboard address
STDOUT_MARK = "[stdout] "  # written by p5ray.jobentry before each line of the verb's stdout
MAX_FILE_MB = 50  # larger files are left out of the upload (data belongs on shared storage)
EXCLUDES = [  # gitignore syntax, relative to the project root; .gitignore applies as well
    ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", ".mypy_cache",
    ".ipynb_checkpoints", "*.egg-info", "/build", "/dist", "/out", "/runs", "/.quickstart",
    "*.log", "*.parquet", "*.pt", "*.safetensors", "*.ckpt", "*.npy", "*.npz",
]
PATH_FLAGS = {
    "--data", "--input", "--out", "--storage", "--checkpoint", "--config", "--search-space",
    "--output", "--init-from", "--vocab-from", "--user-features", "--item-features", "--users",
}
OUTPUT_FLAGS = {"--out", "--storage", "--output"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# -- where and as whom ------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """--address, else RAY_ADDRESS, else Ray's default; always an http(s) dashboard URL."""
    address = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    if address.startswith("ray://") or address == "auto":
        raise ClusterError(
            f"{address} is not a Ray dashboard address",
            "pass the dashboard URL of the cluster, e.g. --address http://HEAD:8265",
        )
    return address if "://" in address else f"http://{address}"


def find_token() -> tuple[str | None, str]:
    """(token, where it came from); (None, reason) when there is none or auth is disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if not os.path.isfile(path):
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} does not exist", "point it at the cluster's token file")
        return Path(path).read_text().strip() or None, path
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None, str(default)
    return None, "no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"


@dataclass
class Connection:
    address: str
    token: str | None
    token_source: str

    @contextlib.contextmanager
    def errors(self):
        """Ray SDK failures -> ClusterError (exit 2, one line): no cluster, missing or wrong token."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            if self.token is None:
                raise ClusterError(
                    f"the cluster at {self.address} requires an auth token and none was found",
                    "copy the cluster's token (`ray get-auth-token` on its head node) to "
                    "~/.ray/auth_token, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH",
                ) from exc
            raise ClusterError(
                f"the cluster at {self.address} rejected the auth token from {self.token_source}",
                "use that cluster's token: `ray get-auth-token` on its head node",
            ) from exc
        except (ConnectionError, requests.exceptions.ConnectionError) as exc:
            raise ClusterError(
                f"no Ray cluster answers at {self.address}",
                "start one (`ray start --head`, `ray up cluster.yaml`) or pass --address / set "
                "RAY_ADDRESS to its dashboard URL, e.g. http://HEAD:8265",
            ) from exc

    def client(self):
        from ray.job_submission import JobSubmissionClient

        from p5ray.raycluster import verbose

        if not verbose():  # importing Ray set its logger back to INFO: no upload chatter
            logging.getLogger("ray").setLevel(logging.WARNING)

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        with self.errors():
            try:
                return JobSubmissionClient(self.address, headers=headers)
            except RuntimeError as exc:
                raise ClusterError(f"{self.address} does not answer like a Ray dashboard: {exc}") from exc


def connect(address: str | None):
    token, source = find_token()
    conn = Connection(resolve_address(address), token, source)
    return conn, conn.client()


# -- what is uploaded -------------------------------------------------------------------------


def project_root() -> Path | None:
    """The checkout p5ray runs from (pyproject.toml beside the package), None if installed."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def upload_excludes(root: Path) -> tuple[list[str], list[str]]:
    """(runtime_env excludes, files left out for size) for uploading `root`."""
    spec = exclude_spec(root, EXCLUDES)
    big = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not spec.match_file(str(rel_dir / d))]
        for name in filenames:
            rel = rel_dir / name
            if spec.match_file(str(rel)):
                continue
            with contextlib.suppress(OSError):
                if (Path(dirpath) / name).stat().st_size > MAX_FILE_MB * 2**20:
                    big.append("/" + rel.as_posix())
    return EXCLUDES + big, big


def exclude_spec(root: Path, excludes: list[str]):
    """Ray's own gitignore matcher over `excludes` plus the root .gitignore and .rayignore."""
    from ray._private.thirdparty.pathspec import PathSpec

    lines = list(excludes)
    for name in (".gitignore", ".rayignore"):
        if (root / name).is_file():
            lines += (root / name).read_text().splitlines()
    return PathSpec.from_lines("gitwildmatch", lines)


def is_uploaded(root: Path, rel: Path, spec) -> bool:
    """Whether the project-relative path is uploaded: not excluded, nor anything in it."""
    parts = rel.parts
    if any(spec.match_file("/".join(parts[: i + 1])) for i in range(len(parts))):
        return False
    if not (root / rel).is_dir():
        return True
    for dirpath, _, filenames in os.walk(root / rel):
        for name in filenames:
            if spec.match_file((Path(dirpath) / name).relative_to(root).as_posix()):
                return False
    return True


def path_arguments(argv: list[str], cwd: Path) -> list[tuple[str, str]]:
    """(flag, value) for every argument that names a path: known path flags, existing positionals."""
    found = []
    for i, token in enumerate(argv):
        flag, _, value = token.partition("=")
        if flag in PATH_FLAGS and value:
            found.append((flag, value))
        elif token in PATH_FLAGS and i + 1 < len(argv):
            found.append((token, argv[i + 1]))
        elif not token.startswith("-") and (i == 0 or argv[i - 1] not in PATH_FLAGS) and (cwd / token).exists():
            found.append(("", token))
    return found


def path_warnings(argv: list[str], root: Path | None, spec, cwd: Path) -> list[str]:
    """Why the job may not find (or keep) a path argument; empty when all look reachable."""
    out = []
    verb = argv[0] if argv else ""
    named = path_arguments(argv[1:], cwd)
    if verb in ("train", "tune") and not any(flag == "--storage" for flag, _ in named):
        out.append(f"{verb} without --storage writes runs/ inside the job's temporary working "
                   "directory on the cluster: pass --storage on shared storage or s3://...")
    for flag, value in named:
        if "://" in value:
            continue
        path = Path(value)
        local = (cwd / path).resolve() if not path.is_absolute() else path.resolve()
        inside = root is not None and local.is_relative_to(root)
        if flag in OUTPUT_FLAGS and not path.is_absolute():
            out.append(f"{flag} {value} is relative: it lands in the job's temporary working "
                       "directory on the cluster and is deleted with it; pass a shared path")
        elif inside and not is_uploaded(root, local.relative_to(root), spec):
            out.append(f"{value} is in the local project directory but not (all) uploaded: the "
                       "job cannot read it; put it on storage every node reaches")
        elif not path.is_absolute() and (not inside or cwd.resolve() != root):
            out.append(f"{value} is relative: on the cluster it resolves against the uploaded "
                       f"project directory ({root or 'none'}), not {cwd}")
        elif path.is_absolute() and inside:
            out.append(f"{value} points into the local project directory: a remote cluster has only "
                       "the uploaded copy, elsewhere; pass it relative to the project root")
    return out


def runtime_env(root: Path | None, excludes: list[str], verbose: bool = False) -> dict:
    from p5ray.raycluster import QUIET_ENV

    env = {"env_vars": {"PYTHONUNBUFFERED": "1", **({} if verbose else QUIET_ENV)}}
    if root is not None:
        return {"working_dir": str(root), "excludes": excludes, **env}
    return {"py_modules": [str(Path(__file__).resolve().parent)], **env}  # an installed p5ray


def entrypoint(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "p5ray.jobentry", *argv])


# -- running and watching ---------------------------------------------------------------------


class StreamSplitter:
    """Job log chunks -> marked lines to `out` (unmarked), every other line to `err`."""

    def __init__(self, out, err, marked: bool = True):
        self.out, self.err, self.marked, self.rest = out, err, marked, ""

    def feed(self, chunk: str) -> None:
        lines = (self.rest + chunk).split("\n")
        self.rest = lines.pop()
        for line in lines:
            self._emit(line + "\n")

    def close(self) -> None:
        if self.rest:
            self._emit(self.rest + "\n")
            self.rest = ""

    def _emit(self, line: str) -> None:
        if not self.marked:
            self.out.write(line)
            self.out.flush()
        elif line.startswith(STDOUT_MARK):
            self.out.write(line[len(STDOUT_MARK):])
            self.out.flush()
        else:
            self.err.write(line)
            self.err.flush()


def stream_logs(conn: Connection, client, job_id: str, marked: bool = True) -> None:
    """Follow the job's log until it ends; the stream is split by StreamSplitter."""
    splitter = StreamSplitter(sys.stdout, sys.stderr, marked)

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            splitter.feed(chunk)

    try:
        with conn.errors():
            asyncio.run(tail())
    except (RuntimeError, OSError) as exc:  # a dropped websocket: the job itself goes on
        log.warning("log stream of job %s interrupted (%s); waiting for the job to end", job_id, exc)
    splitter.close()


def wait_terminal(conn: Connection, client, job_id: str, timeout_s: float | None = None) -> str:
    start = time.monotonic()
    while True:
        with conn.errors():
            status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or (timeout_s is not None and time.monotonic() - start > timeout_s):
            return status
        time.sleep(1.0)


def finish(conn: Connection, client, job_id: str, status: str) -> int:
    """Job status on stderr; exit 0 if it succeeded, 1 otherwise (SPEC's submit row)."""
    with conn.errors():
        message = (client.get_job_info(job_id).message or "").strip()
    message = message.splitlines()[0].split(", last available logs")[0][:300] if message else ""
    print(f"job {job_id}: {status}" + (f" ({message})" if status != "SUCCEEDED" and message else ""),
          file=sys.stderr, flush=True)
    return 0 if status == "SUCCEEDED" else 1


def submit(argv: list[str], address: str | None, wait: bool = True, working_dir: str | None = None) -> int:
    """Submit `p5ray VERB ARGS` as a job; stream it and return its exit code unless not `wait`."""
    if not argv:
        raise UserError("nothing to submit", "give a verb after --, e.g. p5ray submit -- train --data DIR")
    if argv[0] == "submit":
        raise UserError("a submitted job cannot submit again", "give the verb itself after --")
    root = Path(working_dir).resolve() if working_dir else project_root()
    excludes, big = upload_excludes(root) if root else (EXCLUDES, [])
    for path in big:
        log.warning("not uploading %s (over %d MB): put large data on shared storage", path.lstrip("/"), MAX_FILE_MB)
    conn, client = connect(address)
    spec = exclude_spec(root, excludes) if root else None
    for warning in path_warnings(argv, root, spec, Path.cwd()):
        log.warning("%s", warning)
    job_id = f"p5ray-{argv[0]}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    with conn.errors():
        try:
            client.submit_job(
                entrypoint=entrypoint(argv),
                submission_id=job_id,
                runtime_env=runtime_env(root, excludes, verbose="--verbose" in argv),
                entrypoint_num_cpus=0,  # the driver only coordinates; CPUs go to workers and data
                metadata={"p5ray_verb": argv[0]},
            )
        except (RuntimeError, ValueError) as exc:  # e.g. package too large, bad runtime_env
            raise ClusterError(f"the cluster at {conn.address} refused the job: {exc}") from exc
    print(f"job {job_id}: submitted to {conn.address}", file=sys.stderr, flush=True)
    if not wait:
        print(f"follow it with `p5ray submit --address {conn.address} --logs {job_id}`", file=sys.stderr)
        return 0
    return attach(conn, client, job_id)


def attach(conn: Connection, client, job_id: str) -> int:
    """Stream a job's logs until it ends; Ctrl-C detaches and leaves the job running."""
    with conn.errors():
        info = _job_info(client, job_id, conn)
    try:
        stream_logs(conn, client, job_id, marked="p5ray.jobentry" in (info.entrypoint or ""))
        status = wait_terminal(conn, client, job_id)
    except KeyboardInterrupt:
        print(f"job {job_id}: detached, still running (`p5ray submit --stop {job_id}` stops it)",
              file=sys.stderr)
        return 130
    return finish(conn, client, job_id, status)


def _job_info(client, job_id: str, conn: Connection):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        raise ClusterError(f"no job {job_id} at {conn.address}", "`ray job list` shows the cluster's jobs") from exc


def run(argv: list[str], address: str | None, wait: bool = True, working_dir: str | None = None,
        status: str | None = None, logs: str | None = None, stop: str | None = None) -> int:
    """The `submit` verb: submit argv, or --status / --logs / --stop an earlier job."""
    if status or logs or stop:
        conn, client = connect(address)
        job_id = status or logs or stop
        with conn.errors():
            _job_info(client, job_id, conn)
            if logs:
                return attach(conn, client, job_id)
            if stop:
                client.stop_job(job_id)
                state = wait_terminal(conn, client, job_id, timeout_s=60)
            else:
                state = str(client.get_job_status(job_id).value)
        print(state)
        return 0
    return submit(argv, address, wait, working_dir)
