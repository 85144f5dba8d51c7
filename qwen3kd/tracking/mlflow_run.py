"""One training job's MLflow run (rank 0): params, tags, per-step metrics, artifacts.

A `MetricsLogger` next to `JsonlMetrics`, which keeps the local copy of every metric either way.
It talks to MLflow through an explicit `MlflowClient` (never the fluent global active run, so
nothing leaks between runs or tests) and never stops training: if MLflow is not installed, the
server does not answer, or any call raises, it logs one warning and does nothing from then on.

`uri=None` keeps everything in the run folder: `sqlite:///<run_dir>/mlflow.db` and artifacts under
`<run_dir>/mlartifacts` (MLflow would otherwise put them in `./mlruns` of the working directory).
The run id is kept in `<run_dir>/mlflow_run_id`, so a resumed job continues the same run.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import TypeVar

from qwen3kd.files import write_text_atomic

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
# Tag under which a param whose value changed on resume is recorded: MLflow refuses to change a
# logged param, and the first value is what the run's first steps were made with.
CHANGED_TAG_PREFIX = "resume_changed/"
# MLflow's limits (mlflow.utils.validation, 3.17), copied so that the module imports without it.
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000

_T = TypeVar("_T")


class MlflowRun:
    """An MLflow run that implements `MetricsLogger`; build it with `MlflowRun.start`."""

    def __init__(self, client: object | None, run_id: str | None, uri: str):
        self._client = client  # None: disabled (never started, failed, or closed)
        self.run_id = run_id
        self.uri = uri
        self._bad_keys: set[str] = set()

    @property
    def active(self) -> bool:
        return self._client is not None

    @classmethod
    def start(cls, uri: str | None, experiment: str, run_dir: Path, run_name: str,
              params: dict[str, object], tags: dict[str, str], timeout_s: float) -> MlflowRun:
        """Start (or, with `<run_dir>/mlflow_run_id` present, continue) the job's run.

        `uri`: an http(s) tracking server, None for a sqlite store in `run_dir`, or any other
        MLflow tracking URI (its artifacts then also go under `run_dir/mlartifacts`).
        `params`: flat (see `lineage.flatten`); values are logged as strings.
        Never raises for MLflow's sake: on failure, returns a disabled (no-op) run.
        """
        run_dir = Path(run_dir).resolve()
        resolved = uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        run = cls(None, None, resolved)
        try:
            if _is_server(resolved):
                _bound_http_time(timeout_s)
                _check_health(resolved, timeout_s)
            run_dir.mkdir(parents=True, exist_ok=True)
            # The library does not print; the run's address is logged below instead.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            # MLflow's usage telemetry calls an outside host from every rank-0 process: cluster
            # nodes often cannot reach it, and a training job has no business doing so.
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=resolved)
            artifacts = None if _is_server(resolved) else (run_dir / "mlartifacts").as_uri()
            exp_id = _experiment_id(client, experiment, artifacts)
            run.run_id, logged = _open_run(client, exp_id, run_dir / RUN_ID_FILE, run_name)
            _log_params_and_tags(client, run.run_id, params, logged, tags)
        except Exception as e:  # ImportError included: MLflow is optional
            run._disable("start", e)
            return run
        run._client = client
        shown = _without_credentials(resolved)
        if _is_server(resolved):
            shown = f"{shown.rstrip('/')}/#/experiments/{exp_id}/runs/{run.run_id}"
        log.info("MLflow run %s (%s): %s", run.run_id, run_name, shown)
        return run

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)

        def call(client) -> None:
            from mlflow.entities import Metric

            entries = []
            for k, v in metrics.items():
                try:
                    entries.append(Metric(k, float(v), ts, step))
                except (TypeError, ValueError):  # one odd value should not cost the others
                    if k not in self._bad_keys:
                        self._bad_keys.add(k)
                        log.warning("MLflow: metric %s=%r is not a number; not logged", k, v)
            for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
                client.log_batch(self.run_id, metrics=chunk)

        self._guarded("log_metrics", call)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or a folder's files) into the run's artifacts at `artifact_path`."""
        path = Path(path)
        if self.active and not path.exists():
            # The caller's mistake, not MLflow's: warn, but keep tracking on.
            log.warning("MLflow: artifact %s does not exist; not logged", path)
            return

        def call(client) -> None:
            copy = client.log_artifacts if path.is_dir() else client.log_artifact
            copy(self.run_id, str(path), artifact_path)

        self._guarded("log_artifact", call)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write `text` as the artifact `artifact_file` (a relative path such as `eval/s1.txt`)."""
        self._guarded("log_text", lambda c: c.log_text(self.run_id, text, artifact_file))

    def close(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED (or FAILED / KILLED).

        Later calls, and calls after a failure, do nothing.
        """
        self._guarded("close", lambda c: c.set_terminated(self.run_id, status=status))
        self._client = None

    def _guarded(self, what: str, fn: Callable[[object], _T]) -> None:
        if self._client is None:
            return
        try:
            fn(self._client)
        except Exception as e:  # tracking must never stop training
            self._disable(what, e)

    def _disable(self, what: str, e: BaseException) -> None:
        self._client = None
        log.warning("MLflow tracking at %s failed in %s (%s: %s); continuing without MLflow, "
                    "metrics are kept locally in metrics.jsonl", _without_credentials(self.uri),
                    what, type(e).__name__, _first_line(e))


def _is_server(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).scheme in ("http", "https")


def _bound_http_time(timeout_s: float) -> None:
    """Bound what one MLflow HTTP call costs when the server is gone (default: minutes).

    MLflow reads these per request (mlflow.environment_variables); setdefault leaves a value the
    user exported in charge. One retry (urllib3 does not sleep before the first) of a request with
    half the budget keeps a dead server's cost near `timeout_s`; the Retry-After header of a
    429/503 is not obeyed, since it may ask for a minute.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s / 2))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER", "false")


def _check_health(uri: str, timeout_s: float) -> None:
    """Raise if nothing answers `<uri>/health` within `timeout_s`.

    Any HTTP answer counts as reachable (a proxy may guard /health), and so does a TLS error (a
    self-signed server that MLflow is told to trust via MLFLOW_TRACKING_INSECURE_TLS or
    MLFLOW_TRACKING_SERVER_CERT_PATH); the client's calls that follow tell the rest.
    """
    url = _without_credentials(uri).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass
    except urllib.error.URLError as e:
        if not isinstance(e.reason, ssl.SSLError):
            raise


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _open_run(client, exp_id: str, id_file: Path, run_name: str) -> tuple[str, dict[str, str]]:
    """The run recorded in `id_file` if the store still has it (set RUNNING again), else a new one.

    Returns its id and the params it already holds.
    """
    run = _recorded_run(client, id_file)
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        log.info("MLflow: continuing run %s", run.info.run_id)
        return run.info.run_id, dict(run.data.params)
    run = client.create_run(exp_id, run_name=run_name)
    write_text_atomic(id_file, run.info.run_id + "\n")  # a job killed here leaves the old id or the new
    return run.info.run_id, {}


def _recorded_run(client, id_file: Path):
    if not id_file.is_file():
        return None
    from mlflow.exceptions import MlflowException

    run_id = id_file.read_text().strip()
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # the store failed: that is not "no such run"
        log.warning("MLflow: run %s of %s is not in the store; starting a new run", run_id, id_file)
        return None
    if run.info.lifecycle_stage == "deleted":
        log.warning("MLflow: run %s of %s was deleted; starting a new run", run_id, id_file)
        return None
    return run


def _log_params_and_tags(client, run_id: str, params: dict[str, object],
                         logged: dict[str, str], tags: dict[str, str]) -> None:
    """Log the params the run does not hold yet, and the tags; a param whose value differs from
    the one logged before (a resumed run) is kept and the new value recorded as a tag."""
    from mlflow.entities import Param, RunTag

    new, changed = {}, {}
    for k, v in params.items():
        s = _param_str(v)
        if k not in logged:
            new[k] = s
        elif logged[k] != s:
            changed[k] = s
    if changed:
        log.warning("MLflow: resumed run %s has %d params that differ from its first start (%s); "
                    "kept the first values, the new ones are tags %s<name>", run_id, len(changed),
                    ", ".join(sorted(changed)), CHANGED_TAG_PREFIX)
    all_tags = {**tags, **{CHANGED_TAG_PREFIX + k: v for k, v in changed.items()}}
    entries = ([Param(k, v) for k, v in new.items()]
               + [RunTag(k, str(v)[:_MAX_TAG_VAL_LENGTH]) for k, v in all_tags.items()])
    for chunk in _chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id,
                         params=[e for e in chunk if isinstance(e, Param)],
                         tags=[e for e in chunk if isinstance(e, RunTag)])


def _param_str(v: object) -> str:
    """How a param value is stored, so a resumed run compares like with like."""
    if isinstance(v, Enum):
        v = v.value
    return str(v)[:_MAX_PARAM_VAL_LENGTH]


def _chunks(items: Sequence[_T], n: int) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _without_credentials(uri: str) -> str:
    """The URI without user:password: for logs, and for /health (urllib cannot parse them)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else ""
