"""`qwen3kd compare` on a real MLflow sqlite store: the table (key metrics, parents, only the config
keys that differ) and the plots (KL per mode over steps, accuracy per phase, dev curves against
steps and FLOPs)."""

from __future__ import annotations

import pytest

from qwen3kd.cli import main
from qwen3kd.tracking.mlflow_run import MlflowRun

pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A parent run and two nested phase runs, as `qwen3kd demo` leaves them."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MlflowRun.start(uri, "exp", tmp_path / "parent", "demo", {"config": "x.yaml"}, {}, 5)
    runs = {}
    for name, lr, kl0 in (("offpolicy", "0.003", 2.0), ("onpolicy", "0.001", 1.5)):
        run = MlflowRun.start(uri, "exp", tmp_path / name, name,
                              {"optim.lr": lr, "model.name": "toy-student", "run.dir": f"runs/{name}"},
                              {"mlflow.parentRunId": parent.run_id}, 5)
        for step in range(1, 6):
            run.log_metrics({"train/kl/think": kl0 / step, "train/kl/no_think": kl0 / step / 2,
                             "train/loss": 1.0 / step}, step)
        run.log_metrics({"accuracy/think": 0.5 if name == "offpolicy" else 0.75,
                         "accuracy/no_think": 0.25}, 0)
        for step in (0, 5):  # a dev curve, as the demo's arms have
            run.log_metrics({"dev/accuracy/think": 0.4 + step * kl0 / 50, "dev/accuracy/no_think": 0.2,
                             "dev/flops": step * kl0 * 1e9}, step)
        run.close()
        runs[name] = run.run_id
    parent.close()
    return uri, runs, parent.run_id


def test_compare_an_experiment_writes_the_table_and_plots(store, tmp_path, capsys):
    import matplotlib.image

    uri, runs, parent = store
    out = tmp_path / "cmp"
    assert main(["compare", "--experiment", "exp", "--uri", uri, "--out", str(out)]) == 0
    text = (out / "runs.md").read_text()
    assert capsys.readouterr().out == text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"demo", "offpolicy", "onpolicy", "run", "key"}
    header = rows["run"].split(" | ")
    on = rows["onpolicy"].split(" | ")
    assert on[header.index("accuracy/think")] == "0.75" and on[header.index("train/kl/think")] == "0.3"
    assert on[header.index("parent")] == "demo" and on[header.index("status")] == "FINISHED"
    # Only the keys whose values differ; bookkeeping (run.dir) and equal ones (model.name) are not shown.
    assert "| optim.lr |" in text and "model.name" not in text and "run.dir" not in text
    for png, min_width in (("kl_by_mode.png", 800), ("accuracy.png", 400), ("dev_curves.png", 800)):
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[1] >= min_width and image.std() > 0  # not blank


def test_compare_run_ids_and_errors(store, tmp_path, capsys):
    uri, runs, _ = store
    out = tmp_path / "two"
    assert main(["compare", runs["onpolicy"], runs["offpolicy"], "--uri", uri, "--out", str(out)]) == 0
    names = [line.split(" | ")[0].strip("| ") for line in (out / "runs.md").read_text().splitlines()[2:4]]
    assert names == ["onpolicy", "offpolicy"]  # the order given
    assert main(["compare", "--experiment", "nope", "--uri", uri, "--out", str(out)]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err
    assert main(["compare", "--uri", uri]) == 2
    assert "give run ids or --experiment" in capsys.readouterr().err
