"""The operations loop on a real Prefect server (`prefect server start` on 127.0.0.1), served by
`hfbatch serve`: a labelled file lands in the watched prefix → watch-data emits
`hfbatch.dataset.updated` → the retrain deployment's trigger starts a training → a version is
registered and gated → the next batch-inference run predicts with the champion. No manual step
between the file landing and the new version. Twice: with a local store on a SQLite-backed server, and
set up as in production: everything on S3 (moto server mode), a server that requires an auth string
and keeps its state in PostgreSQL (Debian's `postgresql`, a cluster of its own started here). Every
process started here is stopped here."""
from __future__ import annotations

import asyncio
import io
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from tests.conftest import MotoServer, free_port
from tests.helpers import start_process, stop_process

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def _wait(what: str, check, timeout: float, logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


AUTH = "hfbatch-ops:prefect-secret-9a8b7c"  # basic auth of the authenticated server (user:password)
AWS_SECRET = "hfbatch-s3-secret-1f2e3d"  # moto takes any credentials: one that no text contains by chance


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port of 127.0.0.1 with its own SQLite database."""
    yield from _server(tmp_path_factory, auth=None)


@pytest.fixture(scope="module")
def prefect_server_auth(tmp_path_factory, postgres):
    """The production set-up: Prefect's own authentication for self-hosted servers (every API call but
    the health check needs the auth string: `PREFECT_SERVER_API_AUTH_STRING` on the server,
    `PREFECT_API_AUTH_STRING` for hfbatch, the CLI, `serve` and workers), and the server's database in
    PostgreSQL (`PREFECT_API_DATABASE_CONNECTION_URL`, on the server only). Without PostgreSQL
    installed, SQLite (`test_production_server_keeps_its_state_in_postgresql` is skipped then)."""
    yield from _server(tmp_path_factory, auth=AUTH, database=postgres)


def _server(tmp_path_factory, auth: str | None, database: PostgresServer | None = None):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"{url}/api", PREFECT_UI_API_URL=f"{url}/api")
    if auth:
        env |= {"PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_API_AUTH_STRING": auth}
    server_env = dict(env, PREFECT_API_DATABASE_CONNECTION_URL=database.url) if database else env
    log = home / "server.log"
    proc = start_process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                         server_env, log)

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/api/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait("the Prefect server", healthy, 180, [log])
        yield {"env": env, "url": url, "log": log, "auth": auth, "home": home, "database": database}
    finally:
        stop_process(proc, signal.SIGINT, 20)


class PostgresServer:
    """A PostgreSQL cluster of its own (initdb into a temporary directory), listening on 127.0.0.1 and a
    free port only, with a password-protected user `hfbatch` and a database `prefect`. As root, the
    server runs as the unprivileged user `postgres` (it refuses root), in a directory that user owns."""

    def __init__(self, bindir: Path):
        self.bindir, self.port, self.password = bindir, free_port(), secrets.token_hex(12)
        self.dir = Path(tempfile.mkdtemp(prefix="hfbatch-pg-"))  # not under pytest's root-only tmp
        self.url = f"postgresql+asyncpg://hfbatch:{self.password}@127.0.0.1:{self.port}/prefect"
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.owner:
            cmd = ["runuser", "-u", self.owner.pw_name, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120,
                       env=dict(os.environ, PGPASSWORD=self.password))

    def start(self) -> PostgresServer:
        (self.dir / "password").write_text(self.password)
        if self.owner:
            for path in (self.dir, self.dir / "password"):
                os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "hfbatch", f"--pwfile={self.dir / 'password'}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
        # durability is not under test here: fsync off spares the shared disk
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w", "-t", "120",
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "hfbatch", "prefect")
        return self

    def stop(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def query(self, sql: str) -> list:
        import asyncpg

        async def fetch():
            conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="hfbatch", password=self.password,
                                         database="prefect")
            try:
                return await conn.fetch(sql)
            finally:
                await conn.close()

        return asyncio.run(fetch())


def postgres_bindir() -> Path | None:
    """Where Debian's PostgreSQL binaries are (/usr/lib/postgresql/<version>/bin, the newest), if installed."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


@pytest.fixture(scope="module")
def postgres():
    """A running PostgreSQL for the production server, or None where Debian's `postgresql` is not
    installed (.ci/run installs it)."""
    bindir = postgres_bindir()
    if bindir is None:
        warnings.warn("PostgreSQL is not installed: the production Prefect server runs on SQLite", stacklevel=2)
        yield None
        return
    server = PostgresServer(bindir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["local", "s3"])
def loop(request, minilm, data_dir, tmp_path_factory):
    """Serve the deployments, let a labelled file land, wait for the triggered retraining, then run
    batch-inference; returns what the checks need. Each variant uses its own model name; the S3 one runs
    against the authenticated server."""
    prefect_server = request.getfixturevalue("prefect_server_auth" if request.param == "s3" else "prefect_server")
    work = tmp_path_factory.mktemp(f"ops-{request.param}")
    env = dict(prefect_server["env"], PREFECT_RUNNER_POLL_FREQUENCY="2", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    moto = None
    if request.param == "s3":
        moto = MotoServer().start()
        env |= {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
        fs = fsspec.filesystem("s3", key="testing", secret=AWS_SECRET, client_kwargs={"endpoint_url": moto.endpoint})
        fs.mkdir("hfbatch")
        root = "s3://hfbatch"
    else:
        fs, root = fsspec.filesystem("file"), str(work)
    name = f"sst2-{request.param}"
    labelled, unlabelled, store = f"{root}/labelled", f"{root}/unlabelled", f"{root}/store"
    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet")

    def put(table, uri):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fs.makedirs(uri.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(uri, buf.getvalue())

    put(sst2.slice(5000, 40).select(["idx", "text"]), f"{unlabelled}/batch.parquet")
    serve_log = work / "serve.log"
    serve = start_process([str(BIN / "hfbatch"), "serve", "--name", name, "--model", minilm, "--watch", labelled,
                           "--input", unlabelled, "--output", f"{root}/predictions/{{date}}/v{{model_version}}",
                           "--watch-interval", "10", "--store", store, "--train-param", "max_train_samples=300",
                           "--train-param", "max_length=32", "--train-param", "save_steps=1000"], env, serve_log)
    registry = f"{store}/models/{name}/registry.json"
    try:
        time.sleep(15)  # watch-data looks at an empty prefix meanwhile: nothing to report
        registered_early = fs.exists(registry)
        put(sst2.slice(0, 400), f"{labelled}/day1.parquet")  # new labelled data lands
        _wait("the triggered retraining to register a version", lambda: fs.exists(registry), 480,
              [serve_log, prefect_server["log"]])
        index = json.loads(fs.cat_file(registry))
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "batch_inference/batch-inference",
                              "--param", f"model={name}", "--watch", "--watch-timeout", "300"],
                             env=env, capture_output=True, text=True, timeout=360)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        manifests = fs.glob(f"{root}/predictions/*/v1/_manifest.json")
        manifest = json.loads(fs.cat_file(manifests[0])) if len(manifests) == 1 else manifests
        time.sleep(12)  # one more look at the same data
        yield {"name": name, "labelled": labelled, "registered_early": registered_early, "index": index,
               "manifest": manifest, "env": env, "server": prefect_server, "fs": fs, "root": root,
               "logs": [serve_log, prefect_server["log"]]}
    finally:
        stop_process(serve, signal.SIGINT, 20)
        if moto:
            moto.stop()


def _api(env: dict):
    """Prefect client settings of the server `env` belongs to (with its auth string, if it has one)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"],
                               PREFECT_API_AUTH_STRING: env.get("PREFECT_API_AUTH_STRING")})


def _runs(env: dict, deployment: str, flow: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName
    with _api(env), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                     deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def test_new_data_retrains_and_next_inference_uses_the_champion(loop):
    assert not loop["registered_early"]
    index = loop["index"]
    assert [v["version"] for v in index["versions"]] == ["1"] and index["champion"] == "1"
    assert loop["manifest"]["model"] == loop["name"], loop["manifest"]
    assert (loop["manifest"]["model_version"], loop["manifest"]["rows_out"]) == ("1", 40)
    # the event went out once: later looks at the same data started no other training
    retrains = [r for r in _runs(loop["env"], "retrain", "train") if r.parameters.get("name") == loop["name"]]
    assert len(retrains) == 1 and retrains[0].state.is_completed()
    assert retrains[0].parameters["dataset"] == loop["labelled"]  # from the event's payload
    assert len(_runs(loop["env"], "watch-data", "watch_data")) >= 3


def test_two_trainings_of_one_name_never_overlap(prefect_harness):
    """The train flow's global concurrency limit (one slot per model name): a second holder waits for
    the first, whatever started them; another name does not wait."""
    import threading

    from hfbatch.flows.training import one_training_per_name

    events = []

    def hold(name: str, tag: str) -> None:
        with one_training_per_name(name):
            events.append(("in", tag))
            time.sleep(5)  # long enough for the other name's slot to be taken meanwhile on a busy server
            events.append(("out", tag))

    threads = [threading.Thread(target=hold, args=("lock-a", tag)) for tag in ("first", "second")]
    threads.append(threading.Thread(target=hold, args=("lock-b", "other")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    same = [e for e in events if e[1] != "other"]
    assert [kind for kind, _ in same] == ["in", "out", "in", "out"] and same[0][1] == same[1][1], events
    other_in = events.index(("in", "other"))
    assert other_in < events.index(same[1]) or other_in < events.index(same[3]), events  # lock-b ran alongside


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(url: str, screenshot: Path | None = None) -> str:
    """The DOM of `url` after its scripts ran (headless Chromium), and optionally a screenshot."""
    args = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
            "--virtual-time-budget=30000"]
    if screenshot:
        subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium package (.ci/run installs it)")
def test_prefect_ui_shows_the_runs_and_the_training_metrics(loop):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    if loop["server"]["auth"]:
        pytest.skip("the UI of the authenticated server asks for the login first; the other variant shows it")
    url, name = loop["server"]["url"], loop["name"]
    retrain = next(r for r in _runs(loop["env"], "retrain", "train") if r.parameters.get("name") == name)
    record = ROOT / "test-output"
    record.mkdir(exist_ok=True)
    inference = _runs(loop["env"], "batch-inference", "batch_inference")[0]
    for run, flow in ((retrain, "train"), (inference, "batch_inference")):
        page = _browse(f"{url}/runs/flow-run/{run.id}", record / f"prefect-ui-{flow}-{name}.png")
        assert run.name in page and flow in page and "Completed" in page, (run.name, page[-2000:])
    with _api(loop["env"]), get_client(sync_client=True) as client:
        metrics = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"{name}-eval-metrics"])))
    assert len(metrics) == 1
    page = _browse(f"{url}/artifacts/artifact/{metrics[0].id}", record / f"prefect-ui-metrics-{name}.png")
    accuracy = round(loop["index"]["versions"][0]["metrics"]["accuracy"], 4)
    assert f"{name}-eval-metrics" in page and "accuracy" in page and str(accuracy) in page
    assert (record / f"prefect-ui-metrics-{name}.png").stat().st_size > 10_000


def test_auth_refuses_strangers_and_no_secret_is_written_anywhere(loop):
    """Against the authenticated server (the S3 variant): an API call without the auth string is refused,
    and neither that string, the S3 secret key nor the database password is in the store, the
    predictions, the flow runs' parameters, their logs, the artifacts, the deployments, the blocks or the
    processes' output."""
    import urllib.error

    from prefect.client.orchestration import get_client

    if not loop["server"]["auth"]:
        pytest.skip("the S3 variant runs against the authenticated server")
    request = urllib.request.Request(f"{loop['server']['url']}/api/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401

    secrets = (AUTH.encode(), AUTH.split(":")[1].encode(), AWS_SECRET.encode())
    if loop["server"]["database"]:  # the database's password stays with the server
        secrets += (loop["server"]["database"].password.encode(),)
    fs = loop["fs"]
    objects = list(fs.find(loop["root"].removeprefix("s3://")))
    assert len(objects) > 20  # the store, the data and the predictions
    for path in objects:
        data = fs.cat_file(path)
        assert not any(secret in data for secret in secrets), path
    with _api(loop["env"]), get_client(sync_client=True) as client:
        seen = [client.read_flow_runs(), client.read_logs(), client.read_artifacts(), client.read_deployments(),
                client.read_block_documents(include_secrets=True)]
    text = json.dumps([[x.model_dump(mode="json") for x in group] for group in seen], default=str).encode()
    assert len(seen[1]) > 20 and not any(secret in text for secret in secrets)
    for log in loop["logs"]:
        assert not any(secret in log.read_bytes() for secret in secrets), log.name


def test_production_server_keeps_its_state_in_postgresql(loop):
    """The production server's flow runs, task runs and artifacts are rows of its PostgreSQL database (the
    same ones the API answers with), and it wrote no SQLite database."""
    from prefect.client.orchestration import get_client

    database = loop["server"]["database"]
    if not database:
        pytest.skip("needs Debian's postgresql package (.ci/run installs it)" if loop["server"]["auth"]
                    else "the S3 variant runs against the PostgreSQL-backed server")
    with _api(loop["env"]), get_client(sync_client=True) as client:
        flow_runs = {str(r.id) for r in client.read_flow_runs(limit=200)}
        artifacts = {str(a.id) for a in client.read_artifacts()}
    # read after the API: watch-data goes on running meanwhile, so the database may hold more
    assert flow_runs <= {str(r["id"]) for r in database.query("SELECT id FROM flow_run")}
    assert artifacts <= {str(r["id"]) for r in database.query("SELECT id FROM artifact")}
    tasks = {r["name"] for r in database.query("SELECT DISTINCT split_part(name, '-', 1) AS name FROM task_run")}
    assert {"ingest", "tokenize", "train", "evaluate", "register", "shard"} <= tasks, tasks
    assert len(flow_runs) >= 5 and not list(loop["server"]["home"].glob("*.db"))
