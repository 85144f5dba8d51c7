"""The teacher at a parallel layout of its own, under torchrun (gloo, 2 processes): an MoE teacher
with expert parallelism teaches a dense student exactly as in one process, a teacher with the
student's own weights gives zero KL at another layout, and a layout or checkpoint that does not fit
fails on every rank before any collective. (The other layout pairs are in test_offpolicy.py.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import ROOT, SMOKE, qwen3kd
from test_offpolicy import assert_same_metrics

from qwen3kd.tracking import read_metrics

pytestmark = pytest.mark.distributed
MODELS = ROOT / "configs" / "models"


def config_with_teacher(tmp_path, preset: str) -> str:
    """offpolicy-tiny with another teacher architecture."""
    out = tmp_path / f"offpolicy-{preset}"
    out.write_text(f"include: [{SMOKE / 'offpolicy-tiny.yaml'}, {MODELS / preset}@teacher]\n")
    return str(out)


def common(a, student_hf, teacher) -> list[str]:
    return [f"data.path={a / 'train.jsonl'}", f"data.eval_path={a / 'eval.jsonl'}",
            f"data.tokenizer={a / 'tokenizer'}", f"teacher.load={teacher}",
            f"checkpoint.load={student_hf}", "parallel.tensor=1", "train.steps=3",
            "optim.warmup_steps=1", "checkpoint.save_final=false", "tracking.enabled=false"]


def test_moe_teacher_at_ep2_teaches_a_dense_student_like_one_process(toy_assets, student_hf,
                                                                     moe_teacher_hf, tmp_path):
    """(a) The 235B-A22B → dense shape: the dense student at TP=1 × DP=2 has no expert
    parallelism; the MoE teacher runs at EP=2 over the same two ranks."""
    cfg = config_with_teacher(tmp_path, "tiny-moe-teacher.yaml")
    args = [cfg, *common(toy_assets, student_hf, moe_teacher_hf), "eval.interval=0"]
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(qwen3kd, "train", *args, f"run.dir={tmp_path / 'one'}")
        ep2 = pool.submit(qwen3kd, "train", *args, "teacher.parallel.expert=2",
                          f"run.dir={tmp_path / 'ep2'}", nproc=2)
        one.result()
        assert "teacher layout: world=2 tp=1 pp=1 dp=2 ep=2" in ep2.result().stderr
    assert_same_metrics({n: read_metrics(tmp_path / n) for n in ("one", "ep2")}, "one")


def test_self_distillation_at_another_layout_gives_zero_kl(toy_assets, student_hf, tmp_path):
    """The teacher is the student (same weights; tied embeddings, so its output layer comes from
    the embedding) at TP=2 under the student's TP=1 × DP=2; with a learning rate of 0 the student
    stays the teacher, so KL(teacher ‖ student) is 0 up to fp32 rounding at every step and eval."""
    cfg = config_with_teacher(tmp_path, "tiny-student.yaml")
    qwen3kd("train", cfg, *common(toy_assets, student_hf, student_hf), "optim.lr=0",
            "optim.min_lr=0", "teacher.parallel.tensor=2", "eval.interval=1", "eval.samples=4",
            f"run.dir={tmp_path / 'self'}", nproc=2)
    m = read_metrics(tmp_path / "self")
    assert len(m) == 3
    for x in m:
        for key in ("train/kl", "train/kl/think", "train/kl/no_think", "eval/kl"):
            assert abs(x[key]) <= 1e-6, (x["step"], key, x[key])


def test_teacher_layouts_and_checkpoints_that_do_not_fit_fail_on_every_rank(toy_assets, tmp_path):
    run = [str(SMOKE / "offpolicy-tiny.yaml"), f"data.path={toy_assets / 'train.jsonl'}",
           f"data.eval_path={toy_assets / 'eval.jsonl'}", f"data.tokenizer={toy_assets / 'tokenizer'}",
           f"teacher.load={toy_assets / 'teacher'}", "tracking.enabled=false", "train.steps=1",
           "optim.warmup_steps=0"]
    moe = config_with_teacher(tmp_path, "tiny-moe-teacher.yaml")
    cases = {  # (config, overrides): the one line every rank prints
        # tiny-teacher: 4 heads, 2 KV heads, 4 layers; tiny-moe-teacher: 4 experts; 2 processes.
        (run[0], "teacher.parallel.tensor=4"):
            "teacher.parallel.tensor=4 exceeds teacher.model.num_key_value_heads=2",
        (run[0], "teacher.parallel.tensor=1", "teacher.parallel.pipeline=4"):
            "world size 2 is not divisible by teacher.parallel.tensor × teacher.parallel.pipeline = 1 × 4",
        (run[0], "teacher.parallel.tensor=1", "teacher.parallel.pipeline=3"):
            "teacher.parallel.pipeline=3 does not divide teacher.model.num_hidden_layers=4",
        (moe, "teacher.parallel.expert=3"):
            "teacher.parallel.expert=3 does not divide teacher.model.num_experts=4",
        (run[0], "teacher.model.hidden_size=64"):
            f"teacher.load: {toy_assets / 'teacher'}/config.json does not match the model config: "
            "teacher.model.hidden_size: config 64, config.json 128",
    }
    with ThreadPoolExecutor(3) as pool:
        failed = {c: pool.submit(each_rank, "train", c[0], *run[1:], *c[1:],
                                 f"run.dir={tmp_path / str(i)}") for i, c in enumerate(cases)}
    for case, message in cases.items():
        for p in failed[case].result():  # every rank ended by itself: none waits on another
            assert p.returncode == 2, (case, p.stderr[-3000:])
            assert p.stderr.strip().splitlines()[-1].startswith(f"qwen3kd: error: {message}"), \
                p.stderr[-3000:]
            assert "Traceback" not in p.stderr, p.stderr[-3000:]


def each_rank(*args: str, nproc: int = 2, timeout: int = 120) -> list:
    """`qwen3kd ARGS` as the ranks of one job, started the way torchrun starts them but without
    its agent, which would kill the other ranks when the first exits: each must exit by itself
    (a rank that entered a collective would wait for the others until the timeout)."""
    from helpers import _env
    from launcher import launch

    return launch("qwen3kd.cli", list(args), _env(), nproc=nproc, timeout=timeout, separate=True,
                  stop_others=False)


# The megatron parallel_state functions the teacher phase may read (megatron-core 0.16.1): none
# of them picks a group it communicates on. `is_initialized` (utils.get_*_group_if_none checks it
# even when a group is given), the local attention's global memory buffer, and the frozen
# row-parallel layer's look at the global TP group (its gradient all-reduce, never run under
# no-grad). A megatron upgrade that adds a read fails here: check it does not route a collective.
PINNED_READS = {"is_initialized", "get_global_memory_buffer", "get_tensor_model_parallel_group"}


# (name, teacher preset, layout): an MoE teacher at TP=2+SP and EP=2 (its all-reduce / all-gather
# / reduce-scatter / all-to-all) under a dense student at TP=1 × DP=2; a dense teacher at PP=2 (its
# point-to-point) under a student at TP=2.
# Last: the hidden states each rank then holds ([S, B, H_t] per micro-batch: 8 rows a step over
# the student's data-parallel ranks, 2 per micro-batch).
ISOLATION = [
    ("moe-tp2-ep2", "tiny-moe-teacher.yaml",
     ["parallel.tensor=1", "teacher.parallel.tensor=2", "teacher.parallel.expert=2",
      "teacher.parallel.expert_tensor=1"], [[128, 2, 96]] * 2),
    ("pp2", "tiny-teacher.yaml", ["parallel.tensor=2", "teacher.parallel.tensor=1",
                                  "teacher.parallel.pipeline=2"], [[128, 2, 128]] * 4),
]


def test_the_teacher_phase_talks_only_on_teacher_groups(toy_assets, student_hf, moe_teacher_hf,
                                                        tmp_path):
    import json

    from helpers import torchrun

    def run(name: str, preset: str, layout: list[str], hidden):
        teacher = moe_teacher_hf if "moe" in preset else toy_assets / "teacher"
        return torchrun(ROOT / "tests" / "distributed" / "teacher_isolation_worker.py",
                        config_with_teacher(tmp_path, preset), str(tmp_path / name),
                        *common(toy_assets, student_hf, teacher), *layout, "eval.interval=0",
                        f"run.dir={tmp_path / f'run-{name}'}", check=False)

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda case: run(*case), ISOLATION))
    for (name, _, _, hidden), p in zip(ISOLATION, done, strict=True):
        assert p.returncode == 0, p.stderr[-5000:]
        for rank in (0, 1):
            r = json.loads((tmp_path / f"{name}.{rank}").read_text())
            assert r["foreign"] == [], (name, r["foreign"])
            assert "all_to_all_single" in r["ops"] and r["teacher_groups_used"] >= 2, (name, r)
            assert set(r["parallel_state"]) == PINNED_READS, (name, r["parallel_state"])
            assert r["hidden"] == hidden, (name, r["hidden"])
