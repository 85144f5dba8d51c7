"""Off-policy distillation end to end under torchrun (gloo): layouts agree, the teacher stays
isolated, the smoke run learns and is tracked, and bad input stops the run before training."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import ROOT, SMOKE, global_weights, last_checkpoint, qwen3kd, torchrun
from launcher import free_port

from qwen3kd.config.loader import load_config
from qwen3kd.data.chat import load_tokenizer
from qwen3kd.models.params import count_params
from qwen3kd.tracking import read_metrics
from qwen3kd.tracking.lineage import checkpoint_fingerprint, text_hash, vocab_hash

pytestmark = pytest.mark.distributed
CONFIG = str(SMOKE / "offpolicy-tiny.yaml")
STUDENT = ROOT / "configs" / "models" / "tiny-student.yaml"


def assets(toy_assets, student_hf=None) -> list[str]:
    a = toy_assets
    out = [f"data.path={a / 'train.jsonl'}", f"data.eval_path={a / 'eval.jsonl'}",
           f"data.tokenizer={a / 'tokenizer'}", f"teacher.load={a / 'teacher'}"]
    return out + ([f"checkpoint.load={student_hf}"] if student_hf else [])


# name: (processes, overrides). The teacher takes the student's layout where teacher.parallel
# leaves it null (TP=2+SP), and has its own in the others: (b) student TP=2+SP, teacher TP=1 DP=2;
# (c) student PP=2, teacher TP=2; (d) student TP=1 DP=2, teacher PP=2; (e) student TP=1 DP=2,
# teacher TP=2 from a Megatron checkpoint (`qwen3kd convert`: replica ids from the teacher's own
# data-parallel group, its output layer read by region), in waves of one micro-batch (2 × 128
# tokens: teacher phase and student forward-backward twice a step, gradients accumulated).
LAYOUTS = {
    "tp1": (1, []),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "b:s-tp2sp/t-tp1": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true",
                            "teacher.parallel.tensor=1"]),
    "c:s-pp2/t-tp2": (2, ["parallel.pipeline=2", "teacher.parallel.tensor=2",
                          "teacher.parallel.pipeline=1"]),
    "d:s-dp2/t-pp2": (2, ["teacher.parallel.pipeline=2"]),
    "e:s-dp2/t-tp2-megatron-waves": (2, ["teacher.parallel.tensor=2", "teacher.load={megatron}",
                                         "teacher.tokenizer={tokenizer}", "teacher.wave_tokens=256"]),
}
METRICS = ("train/loss", "train/kl", "train/kl/think", "train/kl/no_think", "train/ce")


def assert_same_metrics(runs: dict[str, list[dict]], ref: str, tol: float = 1e-5) -> None:
    for name, metrics in runs.items():
        assert len(metrics) == len(runs[ref]) == 3, (name, len(metrics))
        for a, b in zip(runs[ref], metrics, strict=True):
            for key in METRICS:
                assert abs(a[key] - b[key]) <= tol, (name, a["step"], key, a[key], b[key])
            assert a["train/tokens"] == b["train/tokens"]


def test_kd_loss_is_the_same_at_every_student_and_teacher_layout(toy_assets, student_hf, tmp_path):
    """Same data and weights: per-step loss, KL, KL per mode and CE agree within 1e-5 whatever
    the student's layout and the teacher's own. The TP=1 run also points at a tracking server
    nobody listens on: it warns and trains on."""
    megatron = tmp_path / "teacher-megatron"
    qwen3kd("convert", str(toy_assets / "teacher"), str(megatron), "--to", "megatron")

    def run(name: str) -> str:
        nproc, layout = LAYOUTS[name]
        layout = [o.format(megatron=megatron, tokenizer=toy_assets / "tokenizer") for o in layout]
        extra = ["tracking.enabled=false"]
        if name == "tp1":
            extra = [f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.timeout_s=2"]
        return qwen3kd("train", CONFIG, *assets(toy_assets, student_hf), "parallel.tensor=1",
                       *layout, "train.steps=3", "optim.warmup_steps=1", "eval.interval=0",
                       "checkpoint.save_final=false", f"run.dir={tmp_path / name}", *extra,
                       nproc=nproc).stderr

    with ThreadPoolExecutor(2) as pool:  # two 2-process jobs side by side: start-up dominates
        stderr = dict(zip(LAYOUTS, pool.map(run, LAYOUTS), strict=True))
    assert "continuing without MLflow, metrics are kept locally" in stderr["tp1"]
    runs = {name: read_metrics(tmp_path / name) for name in LAYOUTS}
    assert [m["step"] for m in runs["tp1"]] == [1, 2, 3]
    assert_same_metrics(runs, "tp1")


def test_the_teacher_gets_no_gradient_no_optimizer_state_and_its_payload_goes(toy_assets, tmp_path):
    """PP=2 (the teacher too): no teacher gradient or optimizer state, weights unchanged."""
    out = tmp_path / "result"
    torchrun(ROOT / "tests" / "distributed" / "offpolicy_worker.py", CONFIG, str(out),
             *assets(toy_assets), "parallel.tensor=1", "parallel.pipeline=2", "train.steps=2",
             "optim.warmup_steps=1", "eval.interval=0", "checkpoint.save_final=false",
             "tracking.enabled=false", f"run.dir={tmp_path / 'run'}")
    for rank in (0, 1):
        r = json.loads((tmp_path / f"result.{rank}").read_text())
        assert r["teacher_params"] > 0 and r["student_grads"] == r["student_params"]
        assert r["teacher_requires_grad"] == r["teacher_grads"] == r["teacher_in_optimizer"] == 0
        assert r["teacher_changed"] == 0
        # The student's last stage got the teacher's hidden states of its 4 micro-batches:
        # 4 × [S=128, B=2, H_t=128] fp32 = 0.5 MiB a step (the slowest rank's figure).
        assert r["payload_mb"] == [0.5, 0.5]


def test_smoke_run_learns_and_its_mlflow_run_holds_metrics_tags_and_artifacts(toy_assets, tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "smoke"
    qwen3kd("train", CONFIG, *assets(toy_assets), f"run.dir={run_dir}", nproc=2, timeout=240)
    m = read_metrics(run_dir)
    kl = [x["train/kl"] for x in m]
    assert len(m) == 30 and sum(kl[-5:]) / 5 < 0.5 * sum(kl[:5]) / 5, kl
    evals = [x["eval/kl"] for x in m if "eval/kl" in x]
    assert len(evals) == 3 and evals[-1] < 0.6 * evals[0], evals
    assert all(x["teacher/payload_mb"] == 0.5 for x in m)  # 4 × [128, 2, 128] fp32 per rank

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    for key in ("train/kl/think", "train/kl/no_think", "train/ce/think", "eval/kl/think",
                "eval/ce/no_think", "time/teacher_forward", "train/tokens_per_s"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train/kl/think")) == 30
    tags = run.data.tags
    tok = load_tokenizer(toy_assets / "tokenizer")
    assert tags["lineage.teacher_checkpoint"] == checkpoint_fingerprint(toy_assets / "teacher")
    assert tags["lineage.student_checkpoint"] == "random-init"  # no checkpoint.load
    assert tags["lineage.tokenizer"] == vocab_hash(tok.get_vocab())
    assert tags["lineage.chat_template"] == text_hash(tok.chat_template)
    assert tags["kd.kind"] == "forward_kl" and tags["kd.temperature"] == "1.0"
    assert run.data.params["kd.alpha"] == "0.9" and run.data.params["parallel.tensor"] == "2"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in arts and "eval" in arts
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert "eval/samples_step_0000030.jsonl" in samples

    # The checkpoint holds the student's weights and nothing of the teacher's.
    weights = global_weights(last_checkpoint(run_dir))
    student = count_params(load_config(STUDENT).model)
    assert sum(w.numel() for w in weights.values()) == student.total


def test_conformance_failures_and_bad_data_stop_before_training(toy_assets, tmp_path):
    from qwen3kd.data.toy_tokenizer import build_toy_tokenizer

    other_vocab = build_toy_tokenizer(tmp_path / "other", corpus=["completely different text"] * 9)
    other_template = tmp_path / "template"
    shutil.copytree(toy_assets / "tokenizer", other_template)
    jinja = other_template / "chat_template.jinja"
    jinja.write_text(jinja.read_text().replace("<|im_start|>assistant", "<|im_start|>model"))
    bad = tmp_path / "bad.jsonl"
    lines = (toy_assets / "train.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"messages": "oops"}'] + lines[2:]) + "\n")
    run = [CONFIG, *assets(toy_assets), "parallel.tensor=1", "tracking.enabled=false",
           "eval.interval=0", "train.steps=1", "optim.warmup_steps=0"]
    cases = {
        f"teacher.tokenizer={other_vocab}": "token → id maps differ",
        f"teacher.tokenizer={other_template}": "chat templates differ",
        "model.vocab_size=512": "vocabulary width: model.vocab_size=512, teacher.model.vocab_size=384",
        f"data.path={bad}": f"{bad}:3: bad sample: 'messages' must be a non-empty list",
    }
    # Each fails in set-up, before a model is built; run side by side to save wall time.
    with ThreadPoolExecutor(len(cases) + 1) as pool:
        failed = {o: pool.submit(qwen3kd, "train", *run, o, f"run.dir={tmp_path / o[:12]}",
                                 check=False) for o in cases}
        # The expert override trains anyway, and says what it overrides.
        forced = pool.submit(qwen3kd, "train", *run, f"teacher.tokenizer={other_template}",
                             "teacher.skip_conformance=true", f"run.dir={tmp_path / 'forced'}")
    for override, message in cases.items():
        p = failed[override].result()
        assert p.returncode == 2, p.stderr[-3000:]
        assert message in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert not (tmp_path / override[:12] / "checkpoints").exists()
    assert "training despite: chat templates differ" in forced.result().stderr


def test_a_jsonl_and_its_prepared_folder_train_alike_bitwise(toy_assets, tmp_path):
    """3 off-policy steps at TP=2 from the JSONL (prepared on first use) and from the folders
    `qwen3kd prepare` wrote: the same losses, bit for bit; the two preparations the same bytes.
    A bad line stops every rank with the same one-line error (rank 1 reads rank 0's)."""
    from pathlib import Path

    base = [CONFIG, *assets(toy_assets), "train.steps=3", "optim.warmup_steps=1", "eval.interval=1", "eval.log_samples=0",
            "tracking.enabled=false"]
    p = qwen3kd("prepare", *base, f"data.cache={tmp_path / 'prepared'}")
    folders = {line.split(":")[0]: Path(line.split(" → ")[1].split(" (")[0])
               for line in p.stdout.splitlines() if " → " in line}
    assert set(folders) == {"data.path", "data.eval_path"}
    lines = (toy_assets / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:5] + ["{not json"] + lines[5:]) + "\n")
    with ThreadPoolExecutor(3) as pool:
        jsonl = pool.submit(qwen3kd, "train", *base, f"data.cache={tmp_path / 'first-use'}",
                            f"run.dir={tmp_path / 'jsonl'}", nproc=2)
        prepared = pool.submit(qwen3kd, "train", *base, f"data.path={folders['data.path']}",
                               f"data.eval_path={folders['data.eval_path']}", f"run.dir={tmp_path / 'prep'}",
                               nproc=2)
        failed = pool.submit(qwen3kd, "train", *base, f"data.path={bad}", f"run.dir={tmp_path / 'bad'}",
                             nproc=2, check=False)
        jsonl.result(), prepared.result()
    a, b = read_metrics(tmp_path / "jsonl"), read_metrics(tmp_path / "prep")
    assert len(a) == len(b) == 3
    for key in (*METRICS, "eval/kl", "eval/ce", "train/tokens"):
        assert [x[key] for x in a] == [x[key] for x in b], key
    first_use = {f.relative_to(f.parents[1]): f.read_bytes() for f in (tmp_path / "first-use").glob("*/shard-*")}
    ours = {f.relative_to(f.parents[1]): f.read_bytes() for f in (tmp_path / "prepared").glob("*/shard-*")}
    assert first_use == ours and len(ours) == 2 * 6  # train, eval: .bin, .idx, flags .bin, .idx, .meta.npy, .done
    p = failed.result()
    assert p.returncode != 0
    message = f"qwen3kd: error: {bad}:6: bad sample: Expecting property name"
    assert p.stderr.count(message) == 2, p.stderr[-3000:]  # both ranks
