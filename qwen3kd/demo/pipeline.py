"""`qwen3kd demo CONFIG`: the whole Qwen3 strong-to-weak recipe, tiny, on a CPU.

Every stage is a real qwen3kd command run in a child process, with its full config written next
to its outputs (`<run.dir>/<stage>/stage.yaml`, rerunnable by hand) and its log beside it:

  assets     the toy task (qwen3kd/demo/task.py): train / held-out problems, a byte-level BPE
             tokenizer with Qwen3's chat template                                         cached
  teacher    `qwen3kd train`: the teacher learns the task from ground truth in both modes,
             exported to a Hugging Face folder with `qwen3kd convert`                     cached
  student    the student's random initialisation (the "before distillation" row)
  generate   `qwen3kd generate`: the teacher answers the training prompts in both modes (in
             *scarce* only the few of answered.jsonl)
  offpolicy  `qwen3kd train`: KD on the teacher's answers (CE + KL to the teacher's logits)
  the arms   `qwen3kd train`, each resumed from offpolicy's last step for `onpolicy.steps` steps:
    control  as many more off-policy steps; in *scarce* (after the others) on fresh teacher
             answers (`fresh`: the teacher answers the on-policy prompts), for the steps whose
             FLOPs, with the teacher's generation of what they learn, match onpolicy's
    onpolicy on-policy distillation: the student answers in vLLM, the teacher scores those
             tokens, reverse KL
    rl       reinforcement learning (GRPO) on the same rollouts: the same prompts, modes and
             sampling seeds as onpolicy at every step, rewarded by the exact-match verifier
    onpolicy_fkl  (recoverable only) onpolicy with forward KL, on the same rollouts
  eval       `qwen3kd eval`: every model answers the held-out test problems greedily and
             `accuracy.samples` times at T = 1 (pass@k) in both modes
  curves     `qwen3kd eval`: each arm's checkpoints (every `demo.curve_interval` steps) answer
             the dev problems: accuracy against steps and FLOPs

The cache (`demo.cache`) is keyed by a hash of what decides its content, so a second demo with
the same settings skips the teacher. Tracking: one MLflow parent run for the demo, a nested run
per training phase (and for the untrained student), each holding its accuracy metrics and, for
the arms, the dev curve (`dev/accuracy/MODE` and `dev/flops` at each kept step);
`<run.dir>/summary.json` holds the table and each arm's compute (keys documented in the README).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from qwen3kd.config.schema import DemoVariant, EvalSet, JobConfig
from qwen3kd.demo.assets import CACHE_VERSION, DONE, build_assets, cache_key
from qwen3kd.errors import ConfigError
from qwen3kd.files import write_text_atomic

log = logging.getLogger(__name__)

ARMS = ("control", "onpolicy", "rl")  # from the off-policy checkpoint, onpolicy.steps steps each
MODELS = ("teacher", "student-before", "offpolicy", *ARMS)
# A variant's arms besides those (study/protocol.md): in *recoverable* on-policy distillation with
# forward KL too, on the same rollouts (is the teacher's full distribution on the student's own
# prefixes, not only on its sampled token, what teaches the check lines?).
EXTRA_ARMS = {DemoVariant.recoverable: ("onpolicy_fkl",)}


def arms_of(variant: DemoVariant) -> tuple[str, ...]:
    return ARMS + EXTRA_ARMS.get(variant, ())


MODES = ("think", "no_think")


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage and its log."""


class GateFailed(StageError):
    """recoverable: the teacher does not repair slips well enough for the variant to test."""


PROGRESS_S = 15.0
# The trainer's progress line ("[####....] step 120/800  loss …  eta 95s"), generate's ("shard
# 3/8: 192/512 prompts done, … ETA 40 s") and eval's ("model 2/6 (offpolicy) evaluated, ETA 30 s"):
# what to echo of a stage's output.
_PROGRESS = re.compile(r"(?:step (\d+)/(\d+)|shard \d+/\d+|model \d+/\d+).*?(?:eta|ETA) \S+(?: s)?")


class Demo:
    def __init__(self, cfg: JobConfig, config_path: Path):
        if cfg.teacher is None:
            raise ConfigError("demo: the experiment config needs a teacher (teacher.model)")
        if not cfg.onpolicy.steps:
            raise ConfigError("demo: onpolicy.steps must be > 0 (the steps of each arm)")
        if cfg.onpolicy.group_size < 2:
            raise ConfigError(f"demo: onpolicy.group_size={cfg.onpolicy.group_size}: the RL arm "
                              f"(GRPO) needs >= 2 answers per prompt (both on-policy arms use it)")
        if cfg.demo.curve_interval < 0 or cfg.demo.dev_problems < 0:
            raise ConfigError("demo.curve_interval and demo.dev_problems must be >= 0")
        if cfg.demo.curve_interval and not cfg.demo.dev_problems:
            raise ConfigError("demo.curve_interval > 0 needs demo.dev_problems > 0 (the curves' problems)")
        if (cfg.demo.test_seed is None) != (cfg.demo.dev_seed is None):
            raise ConfigError("demo.test_seed and demo.dev_seed: set both (held-out sets of their own "
                              "seeds) or neither (all held-out problems from demo.seed)")
        if cfg.demo.concurrent_stages < 1:
            raise ConfigError(f"demo.concurrent_stages must be >= 1, got {cfg.demo.concurrent_stages}")
        if cfg.demo.variant is DemoVariant.scarce and min(cfg.demo.scarce.answered_prompts, cfg.demo.scarce.prompts) < 1:
            raise ConfigError("demo.scarce.answered_prompts and demo.scarce.prompts must be >= 1")
        if cfg.demo.rl_lr_scale <= 0:
            raise ConfigError(f"demo.rl_lr_scale must be > 0, got {cfg.demo.rl_lr_scale}")
        _check_student_layers(cfg)
        self.cfg, self.config_path = cfg, config_path
        self.base = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.root = Path(cfg.run.dir).resolve()
        self.cache = Path(cfg.demo.cache).resolve()
        self.times: dict[str, float] = {}
        self.run_ids: dict[str, str] = {}
        self.sharing = 1  # stages running at once: they share the CPU's threads
        self.gate_result = None  # recoverable: the teacher gate's rates
        self.arms = arms_of(cfg.demo.variant)
        self.models = (*(MODELS[: -len(ARMS)] if cfg.demo.eval_fixed_models else ("offpolicy",)), *self.arms)
        self.matched = None  # scarce: how the control's steps were matched to onpolicy's FLOPs

    @property
    def table_set(self) -> str:
        """The held-out problems the table answers (demo.eval_set): the test set or the dev set."""
        return "eval.jsonl" if self.cfg.demo.eval_set is EvalSet.test else "dev.jsonl"

    # ---- running commands ---------------------------------------------------------------
    def _run(self, stage: str, args: list[str], nproc: int = 1, cwd: Path | None = None) -> None:
        """`qwen3kd ARGS` in a child process (under torchrun when nproc > 1), logged to
        <stage dir>/log.txt, its progress lines (a training step of total with its ETA, a
        generated shard) echoed here at most every PROGRESS_S seconds, so a long stage is seen to
        move; a failure is a StageError with the log's last lines."""
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "-m", "qwen3kd.cli", *args]
        else:
            cmd = [sys.executable, "-m", "qwen3kd.cli", *args]
        logfile = (cwd or self.root / stage) / "log.txt"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        threads = max(1, os.cpu_count() // (nproc * self.sharing))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        log.info("demo: %s: qwen3kd %s (log: %s)", stage, args[0], logfile)
        shown = time.perf_counter()
        with open(logfile, "w") as f, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                errors="replace") as p:
            for line in p.stdout:
                f.write(line)
                found = _PROGRESS.search(line)
                now = time.perf_counter()
                if found and (now - shown >= PROGRESS_S or found[1] is not None and found[1] == found[2]):
                    shown = now
                    log.info("demo: %s  %s", stage, found.group(0))
        if p.returncode:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-15:]
            raise StageError(f"demo stage {stage} failed (exit {p.returncode}); its log is "
                             f"{logfile}:\n" + "\n".join(tail))

    def _stage_config(self, stage: str, d: dict, run_dir: Path) -> Path:
        d["run"] = {"name": stage, "dir": str(run_dir)}
        d["tracking"]["parent_run_id"] = self.parent_id
        d["tracking"]["uri"] = self.tracking_uri
        d["tracking"]["enabled"] = self.parent_id is not None
        # What the experiment derives from run.dir, derived again from the stage's own.
        d["checkpoint"]["dir"] = str(run_dir / "checkpoints")
        d["generate"]["output"] = str(run_dir / "generated.jsonl")
        d["accuracy"]["output"] = str(run_dir / "accuracy.json")
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "stage.yaml"
        write_text_atomic(path, f"# qwen3kd demo stage '{stage}', from {self.config_path}\n"
                          + yaml.safe_dump(d, sort_keys=False))
        return path

    def _timed(self, stage: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.times[stage] = round(time.perf_counter() - start, 1)
        log.info("demo: %s done in %.0f s", stage, self.times[stage])
        return out

    def _concurrently(self, stages: dict[str, tuple]) -> dict:
        """Independent stages ({name: (fn, *args)}), up to demo.concurrent_stages at once (each a
        child process driven from a thread here); their results by name. A failure is raised
        once the others have finished (a stage is never left running unwatched)."""
        from concurrent.futures import ThreadPoolExecutor

        width = min(self.cfg.demo.concurrent_stages, len(stages))
        self.sharing = width
        start = time.perf_counter()
        try:
            with ThreadPoolExecutor(width) as pool:
                futures = {name: pool.submit(self._timed, name, *job) for name, job in stages.items()}
            out = {name: f.result() for name, f in futures.items()}
        finally:
            self.sharing = 1
        if width > 1:
            log.info("demo: %s done at once in %.0f s", ", ".join(stages), time.perf_counter() - start)
        return out

    # ---- stages -------------------------------------------------------------------------
    def assets(self) -> Path:
        return build_assets(self.cfg, self.cache)

    def gate(self, assets: Path, teacher: Path) -> dict:
        """recoverable: the teacher gate (qwen3kd/study/gate.py) on the held-out gate problems,
        written to <run.dir>/gate.json; a failed gate stops the demo (GateFailed) before any arm."""
        from qwen3kd.study.gate import teacher_gate

        result = teacher_gate(self.cfg, teacher, assets / "gate.jsonl").as_dict()
        write_text_atomic(self.root / "gate.json", json.dumps(result, indent=1) + "\n")
        if not result["passed"]:
            raise GateFailed(f"teacher gate failed ({result}): the recoverable variant is void "
                             f"(study/protocol.md, section 4)")
        return result

    def teacher_entry(self, assets: Path) -> Path:
        """The teacher's cache entry: named by a hash of everything that decides its weights."""
        t = self.base
        recipe = {k: v for k, v in t["demo"]["teacher"].items() if k != "seed"}
        spec = {"version": CACHE_VERSION, "assets": assets.name, "model": t["teacher"]["model"],
                "recipe": recipe, "train": {**{k: t["train"][k] for k in (
                    "seq_length", "micro_batch_size", "precision")}, "seed": t["demo"]["teacher"]["seed"]},
                "nproc": self.cfg.demo.nproc, "parallel": t["parallel"], "optim": t["optim"]}
        return self.cache / f"teacher-{cache_key(spec)}"

    def teacher(self, assets: Path) -> Path:
        """The trained teacher's Hugging Face folder (from the cache when it is there)."""
        out = self.teacher_entry(assets)
        hf = out / "hf"
        if (out / DONE).is_file():
            log.info("demo: teacher from the cache (%s)", out)
            self.teacher_cached = True
            return hf
        self.teacher_cached = False
        shutil.rmtree(out, ignore_errors=True)
        d, r = deepcopy(self.base), self.cfg.demo.teacher
        d["model"], d["teacher"], d["phases"], d["resume"] = d["teacher"]["model"], None, ["offpolicy"], "never"
        d["data"].update(kind="chat", path=str(assets / "truth.jsonl"), eval_path=None,
                         tokenizer=str(assets / "tokenizer"))
        d["train"].update(steps=r.steps, global_batch_size=r.global_batch_size, seed=r.seed)
        d["optim"].update(lr=r.lr, min_lr=r.min_lr, decay=r.decay.value, warmup_steps=r.warmup_steps)
        d["eval"]["interval"] = 0
        d["checkpoint"].update(load=None, interval=0, save_final=True, keep_last=1)
        stage = self._stage_config("teacher", d, out)
        self._run("teacher", ["train", str(stage)], self.cfg.demo.nproc, cwd=out)
        self.run_ids["teacher"] = _run_id(out)
        ckpt = _last_checkpoint(out / "checkpoints")
        self._run("teacher", ["convert", str(ckpt), str(hf), "--to", "hf"], cwd=out / "export")
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(assets / "tokenizer").save_pretrained(hf)
        write_text_atomic(out / DONE, "")
        return hf

    def student(self, assets: Path, teacher: Path) -> Path:
        """The student before distillation: random, or the teacher with only some layers."""
        out = self.root / "student-before"
        keep = self.cfg.demo.student_layers
        if keep is None:
            from qwen3kd.toy import random_qwen3, save_hf

            return save_hf(random_qwen3(self.cfg.model, self.cfg.train.seed), out, assets / "tokenizer")
        return depth_pruned(teacher, out, list(keep))

    def generate(self, assets: Path, teacher: Path, prompts: str = "prompts.jsonl", stage: str = "generate") -> Path:
        d = deepcopy(self.base)
        d["teacher"]["load"] = str(teacher)
        d["generate"].update(prompts=str(assets / prompts), both_modes=True)
        run_dir = self.root / stage
        config = self._stage_config(stage, d, run_dir)
        self._run(stage, ["generate", str(config)])
        return run_dir / "generated.jsonl"

    def _distill(self, name: str, assets: Path, teacher: Path, data: Path, **changes) -> Path:
        d = deepcopy(self.base)
        d["teacher"]["load"] = str(teacher)
        d["data"].update(kind="chat", path=str(data), tokenizer=str(assets / "tokenizer"))
        d["onpolicy"]["prompts"] = str(assets / "prompts.jsonl")
        d["checkpoint"].update(interval=0, save_final=True, keep_last=1)
        # One LR schedule over off-policy + either arm: the arms continue the off-policy run's.
        if d["optim"]["decay_steps"] is None:
            d["optim"]["decay_steps"] = self.cfg.train.steps + self.cfg.onpolicy.steps
        for key, value in changes.items():
            section, _, field = key.partition(".")
            if field:
                d[section][field] = value
            else:
                d[section] = value
        run_dir = self.root / name
        stage = self._stage_config(name, d, run_dir)
        self._run(name, ["train", str(stage)], self.cfg.demo.nproc)
        self.run_ids[name] = _run_id(run_dir)
        return _last_checkpoint(run_dir / "checkpoints")

    def offpolicy(self, assets, teacher, student, data) -> Path:
        return self._distill("offpolicy", assets, teacher, data, phases=["offpolicy"],
                             **{"checkpoint.load": str(student), "resume": "never"})

    def arm(self, name: str, assets, teacher, data, start: Path) -> Path:
        return self._distill(name, assets, teacher, data, **self.arm_changes(name, start))

    def run_arms(self, assets: Path, teacher: Path, data: Path, start: Path) -> dict[str, Path]:
        """Every arm from the off-policy checkpoint `start`, in turn (at once, three trainers and
        two rollout engines on 2 cores took 1.5× as long: README, "The demo"). In *scarce* the
        control runs last: the teacher answers the on-policy prompts (`fresh`), and the control
        continues on those answers for as many steps as match onpolicy's FLOPs."""
        if self.cfg.demo.variant is not DemoVariant.scarce:
            return {a: self._timed(a, self.arm, a, assets, teacher, data, start) for a in self.arms}
        out = {a: self._timed(a, self.arm, a, assets, teacher, data, start) for a in self.arms if a != "control"}
        fresh = self._timed("fresh", self.generate, assets, teacher, "prompts.jsonl", "fresh")
        from qwen3kd.models.params import count_params
        from qwen3kd.tracking import read_metrics

        self.matched = matched_steps(self.compute("onpolicy")["flops"], read_metrics(self.root / "offpolicy"),
                                     count_params(self.cfg.teacher.model).active)
        log.info("demo: scarce: the control runs %d steps on fresh teacher answers (onpolicy's %.3g FLOPs "
                 "/ %.3g per step, the teacher's generation included)", self.matched["steps"],
                 self.matched["onpolicy_flops"], self.matched["step_flops"])
        out["control"] = self._timed("control", self.arm, "control", assets, teacher, fresh, start)
        return {a: out[a] for a in self.arms}

    def arm_changes(self, name: str, start: Path) -> dict:
        """The config of one arm from the off-policy checkpoint `start`, onpolicy.steps steps:
        control (more off-policy), onpolicy (distillation on the student's answers, onpolicy.kd_kind),
        onpolicy_fkl (the same with forward KL) or rl (GRPO on them)."""
        changes = {"resume": str(start)}
        if name == "control":
            steps = self.matched["steps"] if self.matched else self.cfg.onpolicy.steps
            changes.update({"phases": ["offpolicy"], "train.steps": self.cfg.train.steps + steps})
        else:
            changes.update({"phases": ["offpolicy", "onpolicy"],
                            "onpolicy.objective": "grpo" if name == "rl" else "kd"})
        if name == "onpolicy_fkl":
            changes["onpolicy.kd_kind"] = "forward_kl"
        if name == "rl":
            scale = self.cfg.demo.rl_lr_scale
            changes.update({"optim.lr": self.cfg.optim.lr * scale, "optim.min_lr": self.cfg.optim.min_lr * scale})
        if self.cfg.demo.curve_interval:  # the checkpoints of the dev curve
            changes.update({"checkpoint.interval": self.cfg.demo.curve_interval, "checkpoint.keep_last": 0})
        return changes

    def evaluate(self, assets: Path, models: dict[str, Path], stage: str = "eval",
                 prompts: str | None = None, samples: int | None = None) -> dict:
        d = deepcopy(self.base)
        d["accuracy"].update(prompts=str(assets / (prompts or self.table_set)), tokenizer=str(assets / "tokenizer"))
        if samples is not None:
            d["accuracy"]["samples"] = samples
        run_dir = self.root / stage
        config = self._stage_config(stage, d, run_dir)
        self._run(stage, ["eval", str(config), *[f"--model={n}={p}" for n, p in models.items()]])
        return json.loads((run_dir / "accuracy.json").read_text())

    def curves(self, assets: Path, start: Path) -> dict[str, list[dict]]:
        """Per arm, its dev curve: at the branch point (the off-policy checkpoint `start`) and at
        each kept checkpoint, the step, the FLOPs the arm has spent since the branch point and
        the greedy dev accuracy per mode. (It exports the checkpoints it scores itself, so that
        it runs beside the eval stage.)"""
        from qwen3kd.checkpoint.training import complete_checkpoints
        from qwen3kd.tracking import read_metrics

        branch = int(start.name.split("_")[-1])
        models = {f"offpolicy@{branch}": start}
        for arm in self.arms:
            for step, path in complete_checkpoints(self.root / arm / "checkpoints"):
                models[f"{arm}@{step}"] = path
        results = self.evaluate(assets, models, "curves", "dev.jsonl", samples=0)
        out = {}
        for arm in self.arms:
            flops = {r["step"]: self.charged(arm, r) for r in read_metrics(self.root / arm) if "compute/flops" in r}
            points = {branch: results[f"offpolicy@{branch}"]}
            points.update({int(n.split("@")[1]): r for n, r in results.items() if n.startswith(f"{arm}@")})
            out[arm] = [{"step": step, "flops": sum(f for s, f in flops.items() if s <= step),
                         **{mode: r[mode]["accuracy"] for mode in MODES}} for step, r in sorted(points.items())]
        return out

    # ---- the whole demo -----------------------------------------------------------------
    def run(self) -> dict:
        shutil.rmtree(self.root, ignore_errors=True)  # a demo starts afresh (the cache stays)
        self.root.mkdir(parents=True)
        self.tracking_uri, self.parent_id, self.tracker = self._open_parent()
        start = time.perf_counter()
        try:
            assets = self._timed("assets", self.assets)
            teacher = self._timed("teacher", self.teacher, assets)
            if self.cfg.demo.variant is DemoVariant.recoverable:
                self.gate_result = self._timed("gate", self.gate, assets, teacher)
            student = self._timed("student", self.student, assets, teacher)
            scarce = self.cfg.demo.variant is DemoVariant.scarce
            data = self._timed("generate", self.generate, assets, teacher,
                               "answered.jsonl" if scarce else "prompts.jsonl")
            offpolicy = self._timed("offpolicy", self.offpolicy, assets, teacher, student, data)
            arms = self.run_arms(assets, teacher, data, offpolicy)
            models = {"teacher": teacher, "student-before": student, "offpolicy": offpolicy, **arms}
            scored = {m: models[m] for m in self.models}
            done = self._concurrently({"eval": (self.evaluate, assets, scored), **(
                {"curves": (self.curves, assets, offpolicy)} if self.cfg.demo.curve_interval else {})})
            results, curves = done["eval"], done.get("curves", {})
        except BaseException:
            self._close_parent("FAILED")
            raise
        self.times["total"] = round(time.perf_counter() - start, 1)
        summary = self.summary(assets, results, models, curves)
        write_text_atomic(self.root / "summary.json", json.dumps(summary, indent=1) + "\n")
        self._track(summary)
        self._close_parent("FINISHED")
        return summary

    def summary(self, assets: Path, results: dict, models: dict[str, Path], curves: dict) -> dict:
        from qwen3kd.study.gate import recovery

        acc = {m: {mode: results[m][mode]["accuracy"] for mode in MODES} for m in self.models}
        comp = [results["onpolicy"][mode]["compliance"] for mode in MODES]
        compute = {stage: self.compute(stage) for stage in ("offpolicy", *self.arms)}
        # A cached teacher's ledger is in its cache entry; its wall-seconds are another run's.
        compute["teacher"] = self.compute("teacher", Path(models["teacher"]).parent)

        def passes(m: str) -> dict:
            return {mode: results[m][mode].get("pass_at_k", {}) for mode in MODES}

        return {
            "models": results,
            "arms": {a: {**{mode: {"accuracy": acc[a][mode], "pass_at_k": passes(a)[mode],
                                   "compliance": results[a][mode]["compliance"],
                                   "hard": results[a].get(f"{mode}/hard")} for mode in MODES},
                         "flops": compute[a]["flops"], "seconds": compute[a]["seconds"],
                         "cpu_seconds": compute[a]["cpu_seconds"]} for a in self.arms},
            "compute": compute,
            "curves": curves,
            "paths": {m: str(p) for m, p in models.items()},
            "steps": {"teacher": self.cfg.demo.teacher.steps, "offpolicy": self.cfg.train.steps,
                      **{a: self.cfg.onpolicy.steps for a in self.arms},
                      **({"control": self.matched["steps"]} if self.matched else {})},
            "matched": self.matched,  # scarce: the control's steps from onpolicy's FLOPs
            "claims": {
                "onpolicy_beats_control": {mode: acc["onpolicy"][mode] > acc["control"][mode] for mode in MODES},
                "onpolicy_beats_rl": {mode: acc["onpolicy"][mode] > acc["rl"][mode] for mode in MODES},
                "onpolicy_vs_control_paired": self.paired("onpolicy", "control"),
                "onpolicy_vs_rl_paired": self.paired("onpolicy", "rl"),
                # What each arm did to pass@k (the report: RL leaves pass@64 flat, OPD raises it).
                "pass_at_k_change": {a: {mode: {k: v - passes("offpolicy")[mode][k] for k, v in passes(a)[mode].items()}
                                         for mode in MODES} for a in self.arms},
                "rl_flops_over_onpolicy": compute["rl"]["flops"] / compute["onpolicy"]["flops"],
                "onpolicy_gap_to_teacher": {mode: acc["teacher"][mode] - acc["onpolicy"][mode] for mode in MODES}
                if "teacher" in acc else None,
                "onpolicy_compliance_at_least_99pct": min(comp) >= 0.99,
            },
            "variant": self.cfg.demo.variant.value,
            "eval_set": self.cfg.demo.eval_set.value,  # the held-out problems of `models`
            "gate": self.gate_result,
            "recovery": recovery(self.root / "eval" / "accuracy.samples", assets / self.table_set, self.models)
            if self.cfg.demo.variant is DemoVariant.recoverable else None,
            "teacher_cached": self.teacher_cached,
            "seconds": self.times,
            "mlflow": {"uri": self.tracking_uri, "experiment": self.cfg.tracking.experiment,
                       "parent_run_id": self.parent_id, "runs": self.run_ids},
            "config": str(self.config_path),
        }

    def compute(self, stage: str, run_dir: Path | None = None) -> dict:
        """A training stage's compute from its ledger (qwen3kd/trainer/ledger.py): FLOPs and
        CPU-seconds summed over its steps, the wall-seconds inside its steps, and the stage's
        wall-seconds as a whole (process start, model loads and the rollout engine's start
        included)."""
        from qwen3kd.tracking import read_metrics

        rows = [r for r in read_metrics(run_dir or self.root / stage) if "compute/flops" in r]
        return {"flops": sum(self.charged(stage, r) for r in rows),
                "generation_flops": sum(self.charged(stage, r) - r["compute/flops"] for r in rows),
                "cpu_seconds": round(sum(r["compute/cpu_seconds"] for r in rows), 1),
                "step_seconds": round(sum(r["time/step"] for r in rows), 1),
                "seconds": None if stage == "teacher" and self.teacher_cached else self.times[stage]}

    def charged(self, stage: str, row: dict) -> float:
        """A step's FLOPs as the study charges them: the ledger's, and for *scarce*'s control the
        teacher's generation of the fresh answers it learns from (generation_flops)."""
        if self.cfg.demo.variant is DemoVariant.scarce and stage == "control":
            from qwen3kd.models.params import count_params

            return row["compute/flops"] + generation_flops([row], count_params(self.cfg.teacher.model).active)
        return row["compute/flops"]

    def paired(self, a: str, b: str) -> dict:
        """Per mode, the held-out problems only `a` solves and only `b` solves, and McNemar's z
        ((a_only − b_only) / √(a_only + b_only)): |z| > 1.96 is a difference at the 5 % level,
        smaller is within what another seed could turn around."""
        samples = self.root / "eval" / "accuracy.samples"
        right = {m: {(r["prompt_line"], r["mode"]): r["correct"] for r in map(
            json.loads, (samples / f"{m}.jsonl").read_text().splitlines())} for m in (a, b)}
        out = {}
        for mode in MODES:
            keys = [k for k in right[a] if k[1] == mode]
            only_a = sum(right[a][k] and not right[b][k] for k in keys)
            only_b = sum(right[b][k] and not right[a][k] for k in keys)
            z = (only_a - only_b) / (only_a + only_b) ** 0.5 if only_a + only_b else 0.0
            out[mode] = {f"{a}_only": only_a, f"{b}_only": only_b, "z": round(z, 2)}
        return out

    # ---- MLflow -------------------------------------------------------------------------
    def _open_parent(self):
        t = self.cfg.tracking
        if not t.enabled:
            return None, None, None
        from qwen3kd.tracking.mlflow_run import MlflowRun

        params = {"config": str(self.config_path), "demo.cache": str(self.cache)}
        tags = {**t.tags, "qwen3kd.demo": "parent", "qwen3kd.variant": self.cfg.demo.variant.value}
        if t.parent_run_id:  # a study's unit
            tags["mlflow.parentRunId"] = t.parent_run_id
        run = MlflowRun.start(t.uri, t.experiment, self.root, self.cfg.run.name, params, tags, t.timeout_s)
        return run.uri, run.run_id if run.active else None, run

    def _track(self, summary: dict) -> None:
        """Accuracy metrics on each model's run (a nested run of its own for the untrained
        student; one for a cached teacher, pointing at the cache), the summary on the parent."""
        if self.tracker is None or not self.tracker.active:
            return
        from qwen3kd.tracking.mlflow_run import MlflowRun

        for m in self.models:
            metrics = {f"{k}/{mode}": v[k] for mode, v in summary["models"][m].items()
                       if mode != "all" for k in ("accuracy", "compliance", "think_tokens", "response_tokens")}
            metrics.update({f"pass_at_{k}/{mode}": p for mode, v in summary["models"][m].items()
                            if mode != "all" for k, p in v.get("pass_at_k", {}).items()})
            if m in self.run_ids:
                run = MlflowRun.start(self.tracking_uri, self.cfg.tracking.experiment, self.root / m
                                      if m != "teacher" else Path(summary["paths"]["teacher"]).parent,
                                      m, {}, {}, self.cfg.tracking.timeout_s)
            else:
                folder = self.root / f"{m}-run"
                run = MlflowRun.start(self.tracking_uri, self.cfg.tracking.experiment, folder, m, {},
                                      {"mlflow.parentRunId": self.parent_id, "qwen3kd.model": summary["paths"][m]},
                                      self.cfg.tracking.timeout_s)
                self.run_ids[m] = run.run_id
            run.log_metrics(metrics, step=0)
            for point in summary["curves"].get(m, []):  # an arm's dev curve, at its own steps
                run.log_metrics({"dev/flops": point["flops"],
                                 **{f"dev/accuracy/{mode}": point[mode] for mode in MODES}}, step=point["step"])
            run.close()
            self.tracker.log_metrics({f"{m}/{k}": v for k, v in metrics.items()}, step=0)
        summary["mlflow"]["runs"] = self.run_ids
        write_text_atomic(self.root / "summary.json", json.dumps(summary, indent=1) + "\n")
        self.tracker.log_artifact(self.root / "summary.json")
        self.tracker.log_artifact(self.root / "eval" / "accuracy.samples", "samples")

    def _close_parent(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.close(status)


def generation_flops(rows: list[dict], teacher_params: int) -> float:
    """The teacher's FLOPs to generate the answer tokens off-policy steps learn from (their
    metrics rows' train/tokens): 2N per generated token, the ledger's rule for rollouts, each
    learned token generated once (prompt prefill uncharged, as for rollouts)."""
    return sum(2.0 * teacher_params * r["train/tokens"] for r in rows)


def matched_steps(target_flops: float, offpolicy_rows: list[dict], teacher_params: int) -> dict:
    """*scarce*: the control's steps on fresh teacher answers whose FLOPs match `target_flops`
    (onpolicy's): an off-policy step's mean ledger FLOPs plus the teacher's generation of what
    it learns, both from the off-policy stage's metrics rows."""
    rows = [r for r in offpolicy_rows if "compute/flops" in r]
    if not rows:
        raise StageError("scarce: the off-policy stage logged no compute/flops (its metrics.jsonl)")
    per_step = (sum(r["compute/flops"] for r in rows) + generation_flops(rows, teacher_params)) / len(rows)
    return {"steps": max(1, round(target_flops / per_step)), "onpolicy_flops": target_flops, "step_flops": per_step,
            "generation_share": generation_flops(rows, teacher_params) / len(rows) / per_step}


def _check_student_layers(cfg: JobConfig) -> None:
    """demo.student_layers: valid teacher layers, and a student preset that is the teacher with
    that many layers (what depth pruning makes)."""
    keep, t, m = cfg.demo.student_layers, cfg.teacher.model, cfg.model
    if keep is None:
        return
    n = t.num_hidden_layers
    if not keep or sorted(set(keep)) != list(keep) or not all(0 <= i < n for i in keep):
        raise ConfigError(f"demo.student_layers={list(keep)}: increasing teacher layer indices in 0..{n - 1}")
    differ = [f for f in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                          "head_dim", "vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps",
                          "num_experts") if getattr(m, f) != getattr(t, f)]
    if m.num_hidden_layers != len(keep):
        differ.append(f"num_hidden_layers (student {m.num_hidden_layers}, {len(keep)} layers kept)")
    if differ:
        raise ConfigError(f"demo.student_layers: the student (model.*) must be the teacher "
                          f"(teacher.model.*) with {len(keep)} layers; it differs in {', '.join(differ)}")


def depth_pruned(src: Path, dst: Path, keep: list[int]) -> Path:
    """A Hugging Face Qwen3 folder with only the layers `keep` of `src` (renumbered 0..k−1), its
    embedding, final norm and output layer, and the other files of the folder."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, t in load_file(f).items():
            if name.startswith("model.layers."):
                i = int(name.split(".")[2])
                if i not in keep:
                    continue
                name = name.replace(f"model.layers.{i}.", f"model.layers.{keep.index(i)}.", 1)
            weights[name] = t
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = len(keep)
    if isinstance(config.get("layer_types"), list):  # per-layer attention kinds (transformers 5)
        config["layer_types"] = [config["layer_types"][i] for i in keep]
    write_text_atomic(dst / "config.json", json.dumps(config, indent=2) + "\n")
    return dst


def _run_id(run_dir: Path) -> str | None:
    f = run_dir / "mlflow_run_id"
    return f.read_text().strip() if f.is_file() else None


def _last_checkpoint(root: Path) -> Path:
    from qwen3kd.checkpoint import training

    found = training.latest(root)
    if found is None:
        raise StageError(f"no checkpoint under {root}")
    return found
