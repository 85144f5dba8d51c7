"""`qwen3kd study run|report CONFIG`: the pre-registered study (study/protocol.md).

run     the demo's pipeline (qwen3kd/demo/pipeline.py) for every variant × seed of `study.*`, each
        unit in <run.dir>/<variant>/seed-<seed>, nested under one MLflow parent run; every run
        is tagged with the protocol's version (its file's "**Protocol version N**") and the commit
        that last changed it
        (`qwen3kd.protocol_version`, `qwen3kd.protocol_commit`) and the code's commit. Resumable:
        a finished unit (its summary.json) is not rerun. A *recoverable* unit whose teacher gate
        fails voids the variant for every seed (the protocol, section 4).
report  the protocol's analysis (qwen3kd/study/analysis.py) of the finished units: per hypothesis
        and mode the seed-level paired difference, its hierarchical bootstrap intervals, Holm
        over the primary family, held / not held / inconclusive; <run.dir>/report.json and
        report.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from qwen3kd.config.schema import DemoVariant, JobConfig, StudyPhase
from qwen3kd.demo.assets import build_assets
from qwen3kd.demo.pipeline import MODES, arms_of
from qwen3kd.errors import ConfigError
from qwen3kd.files import write_text_atomic
from qwen3kd.study import analysis

log = logging.getLogger(__name__)

VOID = "VOID"  # a variant's marker file: its teacher gate failed
TEST_SET_LOCK = "test_set.sha256"  # <run.dir>/…: the locked test set's hash (test phase)
TEST_SET_TAG = "qwen3kd.test_set_sha256"

# The primary family (protocol, section 1): (id, variant or None for every variant, arm A, arm B,
# kind, modes). `onpolicy` is the protocol's `opd`.
HYPOTHESES = (
    ("H1", DemoVariant.plain, "onpolicy", "control", "equivalence", MODES),
    ("H2", DemoVariant.recoverable, "onpolicy", "control", "superiority", ("think",)),
    ("H2b", DemoVariant.recoverable, "onpolicy", "control", "equivalence", ("no_think",)),
    ("H3", DemoVariant.scarce, "onpolicy", "control", "superiority", MODES),
    ("H4", None, "onpolicy", "rl", "superiority", MODES),
)


def _git(where: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Study:
    def __init__(self, cfg: JobConfig, config_path: Path):
        s = cfg.study
        if not s.variants or not s.seeds:
            raise ConfigError("study.variants and study.seeds must not be empty")
        if len(set(s.seeds)) != len(s.seeds):
            raise ConfigError(f"study.seeds={list(s.seeds)}: a seed appears twice")
        self.protocol = Path(s.protocol)
        if not self.protocol.is_file():
            raise ConfigError(f"study.protocol: {self.protocol} does not exist")
        found = re.search(r"\*\*Protocol version (\d+)\*\*", self.protocol.read_text())
        if not found:
            raise ConfigError(f"study.protocol: {self.protocol} has no '**Protocol version N**' line")
        self.version = int(found[1])
        self.cfg, self.config_path = cfg, config_path
        self.root = Path(cfg.run.dir).resolve()
        self._read: dict[tuple, dict[str, np.ndarray] | None] = {}

    def unit_dir(self, variant: DemoVariant, seed: int) -> Path:
        return self.root / variant.value / f"seed-{seed}"

    def tags(self) -> dict[str, str]:
        """The protocol's version and the commit that last changed its file, the code's commit,
        the phase (dev or test seeds)."""
        where = self.protocol.resolve().parent
        return {"qwen3kd.protocol_version": str(self.version),
                "qwen3kd.study_phase": self.cfg.study.phase.value,
                "qwen3kd.protocol_commit": _git(where, "log", "-1", "--format=%H", "--", self.protocol.name),
                "qwen3kd.commit": _git(where, "rev-parse", "HEAD")}

    def locked_test_set(self, assets: Path) -> str:
        """The test set's sha256 (protocol, section 2): the first test-phase unit records it in
        <run.dir>/test_set.sha256, every later unit must have drawn the same file."""
        test_set = assets / "eval.jsonl"
        sha = hashlib.sha256(test_set.read_bytes()).hexdigest()
        lock = self.root / TEST_SET_LOCK
        if not lock.is_file():
            lock.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(lock, sha + "\n")
            log.info("study: the test set %s is locked (sha256 %s, %s)", test_set, sha, lock)
        elif (locked := lock.read_text().strip()) != sha:
            raise ConfigError(f"{test_set}: sha256 {sha} is not the study's locked test set ({lock}: "
                              f"{locked}); a demo.* key that draws it (seed, eval_problems, test_seed, "
                              f"dev_seed) changed since the first test-seed unit")
        return sha

    # ---- run ----------------------------------------------------------------------------
    def run(self) -> dict:
        from qwen3kd.demo.pipeline import Demo, GateFailed
        from qwen3kd.tracking.mlflow_run import MlflowRun

        t, tags, phase = self.cfg.tracking, self.tags(), self.cfg.study.phase
        self.root.mkdir(parents=True, exist_ok=True)
        uri = t.uri or f"sqlite:///{self.root / 'mlflow.db'}"
        parent = MlflowRun.start(uri, t.experiment, self.root, self.cfg.run.name,
                                 {"config": str(self.config_path)}, {**tags, "qwen3kd.study": "parent"},
                                 t.timeout_s) if t.enabled else None
        status = {}
        try:
            # Seed-major: a study stopped early has every variant at the same seeds.
            for seed in self.cfg.study.seeds:
                for variant in self.cfg.study.variants:
                    unit, key = self.unit_dir(variant, seed), f"{variant.value}/seed-{seed}"
                    if (self.root / variant.value / VOID).is_file():
                        status[key] = "void"
                        continue
                    if (unit / "summary.json").is_file():
                        log.info("study: %s done already", key)
                        status[key] = "done"
                        continue
                    cfg = OmegaConf.merge(self.cfg, {
                        "run": {"name": f"{variant.value}-seed-{seed}", "dir": str(unit)},
                        "demo": {"variant": variant.value, "eval_set": phase.value},
                        "train": {"seed": seed}, "rollout": {"seed": seed},
                        "tracking": {"uri": uri, "tags": tags,
                                     "parent_run_id": parent.run_id if parent and parent.active else None}})
                    if phase is StudyPhase.test:  # (a merge: the merged config is read-only)
                        sha = self.locked_test_set(build_assets(cfg, Path(cfg.demo.cache).resolve()))
                        cfg = OmegaConf.merge(cfg, {"tracking": {"tags": {TEST_SET_TAG: sha}}})
                    log.info("study: %s (%d variants × %d seeds)", key, len(self.cfg.study.variants),
                             len(self.cfg.study.seeds))
                    try:
                        Demo(cfg, self.config_path).run()
                        status[key] = "done"
                    except GateFailed as e:
                        log.error("study: %s", e)
                        write_text_atomic(self.root / variant.value / VOID, str(e) + "\n")
                        status[key] = "void"
        except BaseException:
            if parent is not None:
                parent.close("FAILED")
            raise
        report = self.report()
        if parent is not None:
            parent.log_artifact(self.root / "report.json")
            parent.close("FINISHED")
        return report

    # ---- report -------------------------------------------------------------------------
    def secondary(self) -> list[dict]:
        """H5 (the protocol's secondary hypothesis: intervals, no test): per variant and mode,
        on-policy distillation's pass@k change from the off-policy start minus RL's, k the
        largest of accuracy.pass_k. Both changes are from one start on the same problems, so
        the difference is the paired per-problem pass@k difference of the two arms."""
        s, k = self.cfg.study, max(self.cfg.accuracy.pass_k, default=1)
        rows = []
        for variant in s.variants:
            for mode in MODES:
                a, b = self.pass_at(variant, "onpolicy", mode, k), self.pass_at(variant, "rl", mode, k)
                row = {"id": "H5", "variant": variant.value, "mode": mode, "metric": f"pass@{k}",
                       "a": "onpolicy", "b": "rl"}
                if (self.root / variant.value / VOID).is_file():
                    row["void"] = True
                elif a and set(a) == set(b):
                    c = analysis.compare(analysis.paired_differences(a, b), s.resamples)
                    row.update(seeds=sorted(a), effect=c.effect, ci95=c.ci95)
                rows.append(row)
        return rows

    def curves(self) -> list[dict]:
        """Per variant and arm, its dev curve (the units' summary.json) over the finished seeds:
        at each step every seed reached, the mean FLOPs since the branch point and per mode the
        mean dev accuracy with its seed range; and the first such step (with its FLOPs) at which
        the mean reaches the target, the control's final dev accuracy (mean over seeds)."""
        s, out = self.cfg.study, []
        for variant in s.variants:
            units = [u for seed in s.seeds if (f := self.unit_dir(variant, seed) / "summary.json").is_file()
                     and (u := json.loads(f.read_text()).get("curves"))]
            if not units or not all("control" in u for u in units):
                continue
            target = {mode: float(np.mean([u["control"][-1][mode] for u in units])) for mode in MODES}
            for arm in arms_of(variant):
                by_step = [{p["step"]: p for p in u.get(arm, [])} for u in units]
                points = []
                for step in sorted(set.intersection(*(set(b) for b in by_step))):
                    at = [b[step] for b in by_step]
                    points.append({"step": step, "flops": float(np.mean([p["flops"] for p in at])),
                                   **{mode: [float(np.mean(x := [p[mode] for p in at])), min(x), max(x)]
                                      for mode in MODES}})
                reached = {mode: next(({"step": p["step"], "flops": p["flops"]} for p in points
                                       if p[mode][0] >= target[mode]), None) for mode in MODES}
                out.append({"variant": variant.value, "arm": arm, "seeds": len(units), "target": target,
                            "to_target": reached, "points": points})
        return out

    def correctness(self, variant: DemoVariant, arm: str, mode: str) -> dict[int, np.ndarray]:
        """Per finished seed, the arm's greedy correctness on each test problem of `mode`, in
        problem order."""
        return {seed: by_mode[mode] for seed in self.cfg.study.seeds
                if (by_mode := self._results(variant, seed, arm)) is not None}

    def pass_at(self, variant: DemoVariant, arm: str, mode: str, k: int) -> dict[int, np.ndarray]:
        """Per finished seed, the arm's pass@k on each test problem of `mode` (the unbiased
        estimator from its accuracy.samples correct answers out of n = accuracy.samples)."""
        from qwen3kd.rollout.accuracy import pass_at_k

        n = self.cfg.accuracy.samples
        return {seed: np.array([pass_at_k(n, int(c), k) for c in by_mode[f"sampled/{mode}"]])
                for seed in self.cfg.study.seeds
                if (by_mode := self._results(variant, seed, arm)) is not None and f"sampled/{mode}" in by_mode}

    def _results(self, variant: DemoVariant, seed: int, arm: str) -> dict[str, np.ndarray] | None:
        """A finished unit's arm: per mode its correctness in problem order (each file read once
        per report: the hypotheses share arms)."""
        key = (variant, seed, arm)
        if key not in self._read:
            unit = self.unit_dir(variant, seed)
            self._read[key] = None
            if (unit / "summary.json").is_file():
                rows = sorted((r["mode"], r["prompt_line"], r["correct"], r.get("sampled_correct")) for r in map(
                    json.loads, (unit / "eval" / "accuracy.samples" / f"{arm}.jsonl").read_text().splitlines()))
                by_mode = {mode: [r for r in rows if r[0] == mode] for mode in MODES}
                self._read[key] = {mode: np.array([r[2] for r in by_mode[mode]], dtype=float) for mode in MODES}
                self._read[key].update({f"sampled/{mode}": np.array([r[3] for r in by_mode[mode]], dtype=float)
                                        for mode in MODES if all(r[3] is not None for r in by_mode[mode])})
        return self._read[key]

    def report(self) -> dict:
        s = self.cfg.study
        tests = []
        for hid, only, a, b, kind, modes in HYPOTHESES:
            for variant in s.variants:
                if only is not None and variant is not only:
                    continue
                void = (self.root / variant.value / VOID).is_file()
                for mode in modes:
                    row = {"id": hid, "variant": variant.value, "mode": mode, "a": a, "b": b, "kind": kind}
                    ca, cb = self.correctness(variant, a, mode), self.correctness(variant, b, mode)
                    if void or not ca:
                        row["decision"] = "void" if void else "not run"
                        tests.append(row)
                        continue
                    c = analysis.compare(analysis.paired_differences(ca, cb), s.resamples)
                    spread = float(np.std([np.mean(ca[k] - cb[k]) for k in ca], ddof=1)) if len(ca) > 1 else None
                    row.update(seeds=sorted(ca), effect=c.effect, ci95=c.ci95, ci90=c.ci90,
                               seed_spread=spread, comparison=c,
                               p=c.p_greater if kind == "superiority" else c.p_equivalent(s.margin))
                    tests.append(row)
        tested = [r for r in tests if "p" in r]
        adjusted, rejected = analysis.holm([r["p"] for r in tested], s.alpha)
        for r, p_adj, rej in zip(tested, adjusted, rejected, strict=True):
            r["p_holm"] = p_adj
            r["decision"] = analysis.decide(r["kind"], r.pop("comparison"), rej, s.margin)
        secondary = self.secondary()
        units = {f"{v.value}/seed-{seed}": (self.unit_dir(v, seed) / "summary.json").is_file()
                 for v in s.variants for seed in s.seeds}
        # Every arm of every variant, tested or not (the protocol: everything is reported).
        arms = [{"variant": v.value, "arm": arm, "mode": mode, "accuracy": {str(k): float(x.mean()) for k, x in c.items()}}
                for v in s.variants for arm in ("offpolicy", *arms_of(v)) for mode in MODES
                if (c := self.correctness(v, arm, mode))]
        lock = self.root / TEST_SET_LOCK
        report = {"protocol": str(self.protocol), "protocol_version": self.version,
                  "phase": s.phase.value,
                  "test_set_sha256": lock.read_text().strip() if lock.is_file() else None,
                  "tags": self.tags(), "units_finished": units, "margin": s.margin, "alpha": s.alpha,
                  "hypotheses": tests, "secondary": secondary, "arms": arms, "curves": self.curves()}
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.root / "report.json", json.dumps(report, indent=1) + "\n")
        write_text_atomic(self.root / "report.md", report_table(report))
        return report


def report_table(report: dict) -> str:
    def pts(x: float) -> str:
        return f"{100 * x:+.1f}"

    phase = (f"test seeds on the locked test set (sha256 {report['test_set_sha256']})" if report["phase"] == "test"
             else "dev seeds on the dev set: for tuning, not evidence for or against a hypothesis")
    lines = [f"Phase: {phase}.", "",
             "| hypothesis | variant | mode | comparison | seeds | effect (points) | 95 % CI | 90 % CI | "
             "seed spread | p (Holm) | decision |", "|---|---|---|---|---:|---:|---|---|---:|---:|---|"]
    for r in report["hypotheses"]:
        if "effect" not in r:
            lines.append(f"| {r['id']} | {r['variant']} | {r['mode']} | {r['a']} − {r['b']} ({r['kind']}) "
                         f"| – | – | – | – | – | – | {r['decision']} |")
            continue
        spread = "–" if r["seed_spread"] is None else f"{100 * r['seed_spread']:.1f}"
        lines.append(f"| {r['id']} | {r['variant']} | {r['mode']} | {r['a']} − {r['b']} ({r['kind']}) | "
                     f"{len(r['seeds'])} | {pts(r['effect'])} | [{pts(r['ci95'][0])}, {pts(r['ci95'][1])}] | "
                     f"[{pts(r['ci90'][0])}, {pts(r['ci90'][1])}] | {spread} | {r['p_holm']:.3f} | "
                     f"{r['decision']} |")
    lines += ["", "Secondary (H5, intervals and no test): pass@k change from the off-policy start, "
              "on-policy distillation − RL:", "", "| variant | mode | metric | seeds | effect (points) | 95 % CI |",
              "|---|---|---|---:|---:|---|"]
    for r in report["secondary"]:
        cells = ([str(len(r["seeds"])), pts(r["effect"]), f"[{pts(r['ci95'][0])}, {pts(r['ci95'][1])}]"]
                 if "effect" in r else ["–", "–", "void" if r.get("void") else "not run"])
        lines.append(f"| {r['variant']} | {r['mode']} | {r['metric']} | " + " | ".join(cells) + " |")
    lines += ["", "Greedy accuracy of every arm, mean over its finished seeds (each seed's in brackets):", "",
              "| variant | model | mode | accuracy | per seed |", "|---|---|---|---:|---|"]
    for r in report["arms"]:
        per_seed = ", ".join(f"{k}: {100 * v:.1f}" for k, v in r["accuracy"].items())
        lines.append(f"| {r['variant']} | {r['arm']} | {r['mode']} | "
                     f"{100 * float(np.mean(list(r['accuracy'].values()))):.1f} % | {per_seed} |")
    lines += ["", "Dev curves: greedy dev accuracy per mode, mean over seeds [range], against steps and the "
              "FLOPs spent since the off-policy checkpoint; target: the control's final dev accuracy, "
              "and the first step (FLOPs) at which the mean reaches it:", "",
              "| variant | arm | step | FLOPs | think | no_think |", "|---|---|---:|---:|---|---|"]
    for c in report["curves"]:
        for p in c["points"]:
            cells = [f"{100 * p[m][0]:.1f} [{100 * p[m][1]:.1f}, {100 * p[m][2]:.1f}]" for m in MODES]
            lines.append(f"| {c['variant']} | {c['arm']} | {p['step']} | {p['flops']:.3g} | " + " | ".join(cells) + " |")
        reached = ", ".join(f"{m} (target {100 * c['target'][m]:.1f}): " + (
            f"step {r['step']}, {r['flops']:.3g} FLOPs" if (r := c["to_target"][m]) else "not reached") for m in MODES)
        lines.append(f"| {c['variant']} | {c['arm']} | to target | | {reached} | |")
    return "\n".join(lines) + "\n"
