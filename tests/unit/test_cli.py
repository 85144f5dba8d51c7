"""`qwen3kd train` end to end: a tiny run trains, --dry-run sizes the 235B preset without
tensors, and bad input is one clear line with a non-zero exit."""

from __future__ import annotations

import time

from helpers import ROOT, SMOKE, qwen3kd

from qwen3kd.tracking import read_metrics


def test_smoke_training_run_learns_quickly(tmp_path):
    start = time.monotonic()
    qwen3kd("train", str(SMOKE / "lm-tiny-dense.yaml"), f"run.dir={tmp_path}")
    took = time.monotonic() - start
    m = read_metrics(tmp_path)
    assert [r["step"] for r in m] == list(range(1, 41))
    first, last = m[0]["train/loss"], m[-1]["train/loss"]
    assert first > 5.0  # ≈ ln(256): an untrained model
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "config.yaml").is_file()  # the resolved config is kept with the run
    assert took < 60, f"smoke run took {took:.0f}s"


def test_dry_run_sizes_235b_without_tensors():
    p = qwen3kd("train", str(ROOT / "configs/models/qwen3-235b-a22b.yaml"), "--dry-run",
                "parallel.world_size=256", "parallel.tensor=4", "parallel.pipeline=8",
                "parallel.expert=8", "parallel.first_stage_layers=11",
                "parallel.last_stage_layers=11", "parallel.sequence_parallel=true",
                "train.global_batch_size=512")
    out = p.stdout
    assert "235,093,634,560 parameters" in out
    assert "world=256 tp=4 pp=8 dp=8 ep=8 etp=4 edp=1" in out
    assert "rank    5: tp=1 dp=1 pp=0 ep=1" in out  # megatron order tp-cp-ep-dp-pp
    assert "rank   32: tp=0 dp=0 pp=1 ep=0" in out
    assert "… 192 more ranks" in out
    assert "27.988 B, 29.853 B" in out  # 11 layers + embedding on stage 0, 12 layers in the middle


def test_bad_input_is_one_line(tmp_path):
    cfg = str(SMOKE / "lm-tiny-dense.yaml")
    cases = [
        ([cfg, "train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
        ([cfg, "train.steps=many"], "bad value for 'train.steps'"),
        ([cfg, "parallel.tensor=3", "parallel.world_size=3"],
         "parallel.tensor=3 does not divide model.num_attention_heads=4"),
        ([cfg, "parallel.world_size=2"], "parallel.world_size=2 but the launcher started 1"),
        ([str(tmp_path / "nope.yaml")], "config file not found"),
        ([cfg, "data.kind=tokens", f"data.path={tmp_path}/missing.jsonl"], "data.path: not found"),
    ]
    for args, expected in cases:
        p = qwen3kd("train", *args, check=False, env={"WORLD_SIZE": "1"} if "world_size=2" in args[-1] else None)
        assert p.returncode == 2, (args, p.stderr)
        err = p.stderr.strip().splitlines()
        assert err == [f"qwen3kd: error: {err[0].split('error: ', 1)[1]}"] and expected in err[0], (args, p.stderr)
        assert "Traceback" not in p.stderr


def test_bad_data_line_is_named_and_debug_shows_traceback(tmp_path):
    data = tmp_path / "tokens.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, "x"]}\n')
    args = ["train", str(SMOKE / "lm-tiny-dense.yaml"), "data.kind=tokens", f"data.path={data}",
            f"run.dir={tmp_path / 'run'}", "train.steps=1", "optim.warmup_steps=0"]
    p = qwen3kd(*args, check=False)
    assert p.returncode == 2
    assert f"{data}:2: bad sample" in p.stderr and "Traceback" not in p.stderr
    p = qwen3kd(*args, "--debug", check=False)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_token_file_trains(tmp_path):
    data = tmp_path / "tokens.jsonl"
    data.write_text("".join(f'{{"input_ids": {list(range(i, i + 20))}}}\n' for i in range(16)))
    qwen3kd("train", str(SMOKE / "lm-tiny-dense.yaml"), "data.kind=tokens", f"data.path={data}",
            f"run.dir={tmp_path / 'run'}", "train.steps=2", "optim.warmup_steps=0")
    m = read_metrics(tmp_path / "run")
    assert m[0]["train/tokens"] == 8 * 19  # 8 sequences of 20 ids → 19 predicted tokens each
