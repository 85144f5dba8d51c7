"""MLflow run (real mlflow, sqlite store in tmp_path) and lineage hashes."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from qwen3kd.tracking.lineage import checkpoint_fingerprint, flatten, text_hash, vocab_hash
from qwen3kd.tracking.mlflow_run import RUN_ID_FILE, MlflowRun

# mlflow 3.17's sqlite store with SQLAlchemy 2.1: not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")

_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
             "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
CONFIG = {"optim": {"lr": 3e-4, "betas": [0.9, 0.95]}, "model": {"name": "qwen3-0.6b"},
          "teacher": None}
METRICS = {"train/kl/think": 0.5, "train/kl/no_think": 0.25, "time/step_s": 1.0}


@pytest.fixture
def clean_env(monkeypatch):
    """MlflowRun sets MLflow env settings with setdefault; undo them after each test."""
    for k in _HTTP_ENV:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "qwen3kd.tracking.mlflow_run"]


def _start(run_dir: Path, uri: str | None = None, params=None, timeout_s: float = 5) -> MlflowRun:
    return MlflowRun.start(uri, "qwen3kd-test", run_dir, "run-a",
                           flatten(CONFIG) if params is None else params,
                           {"teacher_fp": "abc123", "git": "deadbeef"}, timeout_s)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_run_logs_params_tags_metrics_artifacts_and_resumes(tmp_path, cwd, clean_env, caplog):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    run = _start(run_dir)
    assert run.active
    for step in (1, 2, 3):
        run.log_metrics({k: v * step for k, v in METRICS.items()}, step)
    run.log_text("sample 1\n", "eval/samples_step3.txt")
    (tmp_path / "resolved.yaml").write_text("optim:\n  lr: 3e-4\n")
    run.log_artifact(tmp_path / "resolved.yaml", "config")
    run.close()
    run.close()  # twice is fine

    client = MlflowClient(run.uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"optim.lr": "0.0003", "optim.betas": "[0.9, 0.95]",
                               "model.name": "qwen3-0.6b", "teacher": "None"}
    assert {k: got.data.tags[k] for k in ("teacher_fp", "git", "mlflow.runName")} == {
        "teacher_fp": "abc123", "git": "deadbeef", "mlflow.runName": "run-a"}
    for k, v in METRICS.items():
        assert _history(client, run.run_id, k) == [(s, v * s) for s in (1, 2, 3)]
    assert sorted(f.path for f in client.list_artifacts(run.run_id)) == ["config", "eval"]
    assert [f.path for f in client.list_artifacts(run.run_id, "eval")] == [
        "eval/samples_step3.txt"]
    assert [f.path for f in client.list_artifacts(run.run_id, "config")] == [
        "config/resolved.yaml"]

    # Resumed job: same run, history goes on; a changed param is kept, its new value a tag.
    changed = {**flatten(CONFIG), "optim.lr": 1e-4}
    again = _start(run_dir, params=changed)
    assert again.run_id == run.run_id
    assert client.get_run(run.run_id).info.status == "RUNNING"
    again.log_metrics({"train/kl/think": 2.0}, 4)
    again.close(status="FAILED")
    got = client.get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.params["optim.lr"] == "0.0003"
    assert got.data.tags["resume_changed/optim.lr"] == "0.0001"
    assert _history(client, run.run_id, "train/kl/think") == [
        (1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0)]
    assert len(_warnings(caplog)) == 1 and "optim.lr" in _warnings(caplog)[0]

    assert list(cwd.iterdir()) == []  # no ./mlruns, ./mlflow.db, ./mlartifacts
    assert sorted(p.name for p in run_dir.iterdir()) == ["mlartifacts", "mlflow.db", RUN_ID_FILE]


def test_failing_call_disables_tracking_with_one_warning(tmp_path, cwd, clean_env, caplog):
    from mlflow import MlflowClient

    run = _start(tmp_path / "run", params={"a": 1})
    run.log_metrics({"train/loss": 1.0}, 1)
    MlflowClient(run.uri).delete_run(run.run_id)  # a real failure: the store refuses to log now
    run.log_metrics({"train/loss": 0.9}, 2)
    assert not run.active
    run.log_metrics({"train/loss": 0.8}, 3)
    run.log_text("x", "x.txt")
    run.log_artifact(tmp_path / "run" / RUN_ID_FILE)
    run.close()
    (msg,) = _warnings(caplog)
    assert "log_metrics" in msg and "metrics.jsonl" in msg and "mlflow.db" in msg
    # A deleted run is not continued: the next start makes a new one.
    new = _start(tmp_path / "run", params={"a": 1})
    assert new.active and new.run_id != run.run_id
    new.close()
    assert list(cwd.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("credentials", ["", "user:secret@"])
def test_unreachable_server_is_one_warning_and_no_op(tmp_path, cwd, clean_env, caplog, credentials):
    where = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    run = _start(tmp_path / "run", uri=f"http://{credentials}{where}", timeout_s=2)
    assert time.monotonic() - t0 < 10
    assert not run.active
    run.log_metrics({"train/loss": 1.0}, 1)
    run.log_artifact(tmp_path / "nothing.txt")
    run.log_text("x", "x.txt")
    run.close()
    (msg,) = _warnings(caplog)
    assert f"http://{where}" in msg and "metrics.jsonl" in msg
    # The credentials are neither shown nor taken for part of the host name.
    assert "secret" not in msg and "Name or service" not in msg
    assert list(cwd.iterdir()) == []


class _HangingHandler(http.server.BaseHTTPRequestHandler):
    """/health answers; every MLflow API call hangs, like a wedged server."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/health":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
        else:
            time.sleep(8)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_hanging_server_costs_about_timeout(tmp_path, cwd, clean_env, caplog):
    import mlflow  # noqa: F401 (imported before the clock starts: its import is not the point)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangingHandler)
    server.daemon_threads, server.block_on_close = True, False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        t0 = time.monotonic()
        run = _start(tmp_path / "run", uri=uri, timeout_s=2)
        elapsed = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    assert not run.active
    assert elapsed < 6, f"a hanging server cost {elapsed:.1f} s with timeout_s=2"
    (msg,) = _warnings(caplog)
    assert uri in msg


# ---- lineage ------------------------------------------------------------------------------------

MIB = 1 << 20


def _checkpoint(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"hidden_size": 64}')
    (root / ".metadata").write_bytes(b"dcp metadata")  # torch_dist's metadata file is hidden
    (root / "rng").mkdir()
    (root / "rng" / "rank0.pt").write_bytes(b"\x01" * 100)
    with (root / "model-00001-of-00001.safetensors").open("wb") as f:
        f.truncate(50 * 1000 * 1000)  # sparse: reading it all would be slow-ish, and pointless
    return root


def _poke(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xff")


def test_checkpoint_fingerprint(tmp_path):
    ck = _checkpoint(tmp_path / "ck")
    shard = ck / "model-00001-of-00001.safetensors"
    t0 = time.monotonic()
    fp = checkpoint_fingerprint(ck)
    assert time.monotonic() - t0 < 1
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert checkpoint_fingerprint(ck) == fp

    # Volatile files next to a checkpoint do not count.
    (ck / ".cache" / "huggingface").mkdir(parents=True)
    (ck / ".cache" / "huggingface" / "x.metadata").write_text("downloaded at 12:00")
    (ck / "model.lock").write_text("")
    assert checkpoint_fingerprint(ck) == fp

    _poke(shard, 25 * 1000 * 1000)  # middle of a large file: not seen (documented)
    assert checkpoint_fingerprint(ck) == fp
    seen = {fp}
    for change in (lambda: _poke(shard, 1000), lambda: _poke(shard, shard.stat().st_size - 1),
                   lambda: (ck / ".metadata").write_bytes(b"dcp metadatA"),
                   lambda: (ck / "rng" / "rank1.pt").write_bytes(b""),
                   lambda: (ck / "rng" / "rank1.pt").rename(ck / "rng" / "rank2.pt"),
                   lambda: (ck / "config.json").write_text('{"hidden_size": 65}')):
        change()
        fp = checkpoint_fingerprint(ck)
        assert fp not in seen
        seen.add(fp)
    with pytest.raises(NotADirectoryError):
        checkpoint_fingerprint(shard)


def test_text_and_vocab_hash():
    assert text_hash("{{ messages }}") == text_hash("{{ messages }}")
    assert text_hash("{{ messages }}") != text_hash("{{ messages }} ")
    assert len(text_hash("")) == 16
    v = {"a": 0, "b": 1, "<think>": 2}
    assert vocab_hash(v) == vocab_hash(dict(reversed(list(v.items()))))  # order-free
    assert vocab_hash(v) != vocab_hash({**v, "b": 3})
    assert vocab_hash(v) != vocab_hash({**v, "c": 3})
    assert len(vocab_hash(v)) == 16


def test_flatten():
    from omegaconf import OmegaConf

    nested = {"optim": {"lr": 1, "betas": [0.9, 0.95]}, "run": {"name": "x", "extra": {}},
              "data": {"mix": [{"path": "a", "w": 1}]}, "teacher": None}
    flat = {"optim.lr": 1, "optim.betas": "[0.9, 0.95]", "run.name": "x",
            "data.mix": '[{"path": "a", "w": 1}]', "teacher": None}
    assert flatten(nested) == flat
    assert flatten(OmegaConf.create(nested)) == flat
    assert flatten({"a": {"b": {"c": True}}}, prefix="cfg") == {"cfg.a.b.c": True}
