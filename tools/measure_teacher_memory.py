"""Peak resident memory of distillation training steps, per rank (torchrun, 2 processes, CPU).

    .venv/bin/python tools/measure_teacher_memory.py --work DIR [--runs 3] [--label NAME]
                                                    [-- key=value …]

Builds once into DIR: the toy tokenizer and chat data (qwen3kd.toy), a random dense student and a
random Qwen3-MoE teacher (Hugging Face folders, presets in DIR/student.yaml, DIR/teacher.yaml) and
DIR/config.yaml (off-policy KD, student TP=1 DP=2, 4 steps). Then runs `qwen3kd train
DIR/config.yaml [key=value …]` RUNS times on 2 local processes (gloo). In each process
Trainer.train is wrapped: before it, VmRSS is read and the high-water mark reset
(`echo 5 > /proc/self/clear_refs`); after it, VmHWM is the peak of the steps. Prints per rank the
medians over the runs (MiB); every raw record is appended to DIR/results.jsonl.

Workers import qwen3kd from the checkout holding this file (its root goes first on PYTHONPATH),
so a copy of this file in a git worktree measures that worktree's code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("measure_teacher_memory")
ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
COMMON = dict(vocab_size=384, max_position_embeddings=1024, num_attention_heads=4,
              num_key_value_heads=2)
STUDENT = dict(name="mem-student", num_hidden_layers=2, hidden_size=128, intermediate_size=256,
               head_dim=32, tie_word_embeddings=True, **COMMON)
TEACHER = dict(name="mem-teacher-moe", num_hidden_layers=4, hidden_size=256, intermediate_size=512,
               head_dim=64, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=512, **COMMON)
TABLE = ("rss_before_train", "peak_rss_during_steps", "peak_minus_before", "teacher_param_bytes")


def _kib(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _param_bytes(obj) -> int:
    """Bytes of the distinct parameters of `obj`: the teacher, or the student's model chunks."""
    parts = obj if isinstance(obj, list) else [obj] if obj is not None else []
    params = [p for part in parts for p in part.parameters()]
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in params}.values())


def _save_hf(preset: Path, out: Path, tokenizer: Path, seed: int) -> None:
    """A random transformers Qwen3 (Qwen3-MoE when the preset has experts), with the tokenizer."""
    import torch
    import transformers as tf

    from qwen3kd.config.loader import load_config

    m = load_config(preset).model
    arch = {k: getattr(m, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rope_theta", "rms_norm_eps", "tie_word_embeddings")}
    torch.manual_seed(seed)
    if m.num_experts:
        hf = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **arch, num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
            moe_intermediate_size=m.moe_intermediate_size, norm_topk_prob=m.norm_topk_prob,
            decoder_sparse_step=1, mlp_only_layers=[]))
    else:
        hf = tf.Qwen3ForCausalLM(tf.Qwen3Config(**arch))
    hf.save_pretrained(out)
    tf.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)


def build_assets(work: Path) -> Path:
    """DIR/config.yaml and everything it points at (built once; an existing config is reused)."""
    import yaml

    config = work / "config.yaml"
    if config.is_file():
        log.info("reusing the assets in %s", work)
        return config
    from qwen3kd.toy import make_toy_assets

    toy = make_toy_assets(work / "toy", train_lines=2048)
    for name, preset, seed in (("student", STUDENT, 1), ("teacher", TEACHER, 2)):
        (work / f"{name}.yaml").write_text(yaml.safe_dump({"model": preset}, sort_keys=False))
        _save_hf(work / f"{name}.yaml", work / f"{name}-hf", toy / "tokenizer", seed)
    job = {
        "include": [str(work / "student.yaml"), f"{work / 'teacher.yaml'}@teacher"],
        "run": {"name": "memory", "dir": str(work / "run")},
        "parallel": {"tensor": 1},
        "data": {"kind": "chat", "path": str(toy / "train.jsonl"),
                 "tokenizer": str(toy / "tokenizer")},
        "teacher": {"load": str(work / "teacher-hf")},
        "checkpoint": {"load": str(work / "student-hf"), "save_final": False},
        "tracking": {"enabled": False},
        "eval": {"interval": 0},
        "kd": {"kind": "forward_kl", "alpha": 0.9},
        "train": {"steps": 4, "global_batch_size": 16, "micro_batch_size": 4, "seq_length": 256},
    }
    config.write_text(yaml.safe_dump(job, sort_keys=False))
    log.info("assets built in %s", work)
    return config


def worker(result: Path, train_args: list[str]) -> int:
    """One torchrun process: `qwen3kd train …` with Trainer.setup and Trainer.train wrapped."""
    import gc

    import qwen3kd
    from qwen3kd.cli import main
    from qwen3kd.trainer.loop import Trainer

    rec = {"rank": int(os.environ["RANK"]), "qwen3kd": qwen3kd.__file__}
    setup, train = Trainer.setup, Trainer.train

    def measured_setup(self):
        rec["rss_before_setup"] = _kib("VmRSS")
        return setup(self)

    def measured_train(self):
        gc.collect()
        rec["teacher_param_bytes"] = _param_bytes(getattr(self, "teacher", None))
        rec["student_param_bytes"] = _param_bytes(self.model)
        rec["rss_before_train"] = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        out = train(self)
        rec["peak_rss_during_steps"] = _kib("VmHWM")
        rec["peak_minus_before"] = rec["peak_rss_during_steps"] - rec["rss_before_train"]
        return out

    Trainer.setup, Trainer.train = measured_setup, measured_train
    code = main(["train", *train_args])
    log.warning("rank %d: qwen3kd from %s: %s", rec["rank"], qwen3kd.__file__, rec)
    with result.open("a") as f:  # one short line per rank
        f.write(json.dumps(rec) + "\n")
    return code


def run_once(config: Path, overrides: list[str], result: Path) -> list[dict]:
    """One torchrun of 2 processes; their records, by rank."""
    result.unlink(missing_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={port}", str(Path(__file__).resolve()), "--worker", "--result",
           str(result), str(config), *overrides]
    log.info("%s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    records = sorted(map(json.loads, result.read_text().splitlines()), key=lambda r: r["rank"])
    for r in records:
        if not Path(r["qwen3kd"]).resolve().is_relative_to(ROOT):
            raise RuntimeError(f"rank {r['rank']} imported {r['qwen3kd']}, not the one in {ROOT}")
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="folder for the assets, the runs and results.jsonl")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--label", default="run", help="this measurement's name in results and table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides for qwen3kd train (after --)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.result, args.overrides)
    if args.work is None:
        p.error("--work is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.path.insert(0, str(ROOT))  # the assets are built with this checkout's qwen3kd too
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config, runs = build_assets(work), []
    for i in range(args.runs):
        runs.append(run_once(config, args.overrides, work / "worker-result.jsonl"))
        log.info("run %d/%d done, qwen3kd from %s", i + 1, args.runs, runs[-1][0]["qwen3kd"])
        with (work / "results.jsonl").open("a") as f:
            for r in runs[-1]:
                extra = {"label": args.label, "run": i, "overrides": args.overrides}
                f.write(json.dumps({**extra, **r}) + "\n")
    print(f"MiB, median of {args.runs} runs, {' '.join(args.overrides) or 'no overrides'}:")
    print(f"| label | rank | {' | '.join(TABLE)} |")
    print("|---|---|" + "---:|" * len(TABLE))
    for rank in range(len(runs[0])):
        med = [statistics.median(run[rank][k] for run in runs) / MIB for k in TABLE]
        print(f"| {args.label} | {rank} | " + " | ".join(f"{v:.1f}" for v in med) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
