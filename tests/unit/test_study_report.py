"""`qwen3kd study report` (qwen3kd/study/run.py) on hand-made unit folders: which hypotheses it
tests on which arms and modes, a clear superiority held, a clear equivalence held, a variant
voided by its teacher gate, and units not run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from qwen3kd.config.loader import load_config
from qwen3kd.errors import ConfigError
from qwen3kd.study.run import TEST_SET_LOCK, VOID, Study

REPO = Path(__file__).resolve().parents[2]


def _unit(root: Path, variant: str, seed: int, accuracy: dict[tuple[str, str], float]) -> None:
    """A finished unit: per arm and mode, 1,000 greedy results with the given accuracy. As two
    models trained from one checkpoint do, the arms agree on most problems: each arm's results
    are one shared draw per problem, thresholded at its accuracy, with 4 % of them flipped."""
    unit = root / variant / f"seed-{seed}"
    samples = unit / "eval" / "accuracy.samples"
    samples.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shared = {mode: rng.random(1000) for mode in ("think", "no_think")}
    for arm in ("offpolicy", "control", "onpolicy", "rl"):
        lines = []
        for mode in ("think", "no_think"):
            right = (shared[mode] < accuracy[arm, mode]) ^ (rng.random(1000) < 0.04)
            # 4 of 8 samples right where the greedy answer is, none elsewhere: pass@8 = greedy.
            lines += [json.dumps({"prompt_line": i + 1, "mode": mode, "correct": bool(c), "sampled_correct": 4 * int(c)})
                      for i, c in enumerate(right)]
        (samples / f"{arm}.jsonl").write_text("\n".join(lines) + "\n")
    (unit / "summary.json").write_text("{}\n")


def test_report_decisions(tmp_path):
    cfg = load_config(REPO / "configs/experiments/demo-arithmetic-cpu.yaml",
                      [f"run.dir={tmp_path}", f"study.protocol={REPO / 'study/protocol.md'}",
                       "study.seeds=[0,1,2]", "study.resamples=2000", "accuracy.samples=8",
                       "accuracy.pass_k=[1,8]"], check_files=False)
    # plain: on-policy = control (equivalence holds), on-policy ≫ RL (superiority holds).
    plain = {("control", m): 0.6 for m in ("think", "no_think")}
    plain.update({("onpolicy", m): 0.6 for m in ("think", "no_think")})
    plain.update({("rl", m): 0.4 for m in ("think", "no_think")})
    plain.update({("offpolicy", m): 0.5 for m in ("think", "no_think")})
    for seed in (0, 1, 2):
        _unit(tmp_path, "plain", seed, plain)
    (tmp_path / "recoverable").mkdir()
    (tmp_path / "recoverable" / VOID).write_text("gate failed\n")
    report = Study(cfg, Path("study.yaml")).report()
    rows = {(r["id"], r["variant"], r["mode"]): r for r in report["hypotheses"]}
    assert set(rows) == {("H1", "plain", "think"), ("H1", "plain", "no_think"),
                         ("H2", "recoverable", "think"), ("H2b", "recoverable", "no_think"),
                         ("H4", "plain", "think"), ("H4", "plain", "no_think"),
                         ("H4", "recoverable", "think"), ("H4", "recoverable", "no_think")}
    assert rows["H4", "plain", "think"]["decision"] == "held"
    assert 0.15 < rows["H4", "plain", "think"]["effect"] < 0.25 and rows["H4", "plain", "think"]["ci95"][0] > 0
    # Equal accuracy, 4 % + 4 % flips per arm: a per-seed difference's standard error is ≈ 0.9
    # points, so 3 seeds × 1,000 problems put the 90 % interval inside ±3 points.
    assert rows["H1", "plain", "think"]["decision"] == "held", rows["H1", "plain", "think"]
    assert rows["H2", "recoverable", "think"]["decision"] == "void"
    assert rows["H4", "recoverable", "no_think"]["decision"] == "void"
    # Holm ran over the four tested rows only, and adjusted p-values are no smaller than raw ones.
    tested = [r for r in report["hypotheses"] if "p" in r]
    assert len(tested) == 4 and all(r["p_holm"] >= r["p"] for r in tested)
    # The version is the protocol file's own "**Protocol version N**" line.
    version = re.search(r"\*\*Protocol version (\d+)\*\*", (REPO / "study/protocol.md").read_text())[1]
    assert report["tags"]["qwen3kd.protocol_version"] == version == str(report["protocol_version"])
    text = (tmp_path / "report.md").read_text()
    assert "| H4 | plain | think | onpolicy − rl (superiority) | 3 |" in text and "| void |" in text
    assert report["phase"] == "dev" and text.startswith("Phase: dev seeds on the dev set")
    # Every arm is reported, tested or not: the off-policy start too, per seed.
    arms = {(r["variant"], r["arm"], r["mode"]): r["accuracy"] for r in report["arms"]}
    assert set(arms) == {("plain", a, m) for a in ("offpolicy", "control", "onpolicy", "rl") for m in ("think", "no_think")}
    assert list(arms["plain", "rl", "think"]) == ["0", "1", "2"] and 0.3 < arms["plain", "rl", "think"]["0"] < 0.5
    assert "| plain | offpolicy | think |" in text
    # H5: pass@8 of on-policy − RL, intervals and no test; here pass@8 is each greedy result.
    h5 = {(r["variant"], r["mode"]): r for r in report["secondary"]}
    assert h5["plain", "think"]["metric"] == "pass@8" and "p" not in h5["plain", "think"]
    assert abs(h5["plain", "think"]["effect"] - rows["H4", "plain", "think"]["effect"]) < 1e-12
    assert h5["recoverable", "think"].get("void") and "| recoverable | think | pass@8 | – | – | void |" in text


def test_the_test_set_is_locked_by_the_first_test_unit(tmp_path):
    cfg = load_config(REPO / "configs/experiments/demo-arithmetic-cpu.yaml",
                      [f"run.dir={tmp_path / 'study'}", f"study.protocol={REPO / 'study/protocol.md'}",
                       "study.phase=test"], check_files=False)
    study = Study(cfg, Path("study.yaml"))
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "eval.jsonl").write_text('{"a": 1}\n')
    sha = study.locked_test_set(assets)
    assert (tmp_path / "study" / TEST_SET_LOCK).read_text() == sha + "\n"
    assert study.locked_test_set(assets) == sha  # the same file again: fine
    (assets / "eval.jsonl").write_text('{"a": 2}\n')
    with pytest.raises(ConfigError, match=r"eval.jsonl: sha256 \w+ is not the study's locked test set"):
        study.locked_test_set(assets)
    assert Study(cfg, Path("study.yaml")).report()["test_set_sha256"] == sha


def test_report_of_units_not_run(tmp_path):
    cfg = load_config(REPO / "configs/experiments/demo-arithmetic-cpu.yaml",
                      [f"run.dir={tmp_path}", f"study.protocol={REPO / 'study/protocol.md'}",
                       "study.variants=[plain]"], check_files=False)
    report = Study(cfg, Path("study.yaml")).report()
    assert {r["decision"] for r in report["hypotheses"]} == {"not run"}
    assert report["units_finished"] == {"plain/seed-100": False, "plain/seed-101": False}
    assert OmegaConf.to_container(cfg.study)["seeds"] == [100, 101]


def test_report_curves_average_the_seeds_and_find_the_step_to_the_target(tmp_path):
    cfg = load_config(REPO / "configs/experiments/demo-arithmetic-cpu.yaml",
                      [f"run.dir={tmp_path}", f"study.protocol={REPO / 'study/protocol.md'}",
                       "study.seeds=[0,1]", "study.variants=[scarce]", "study.resamples=200"], check_files=False)
    acc = {(a, m): 0.5 for a in ("offpolicy", "control", "onpolicy", "rl") for m in ("think", "no_think")}

    def curve(points):  # (step, flops, think, no_think)
        return [{"step": s, "flops": f, "think": t, "no_think": n} for s, f, t, n in points]

    # The control's last step differs between seeds (scarce matches its FLOPs): only the steps
    # every seed reached are averaged; the target is the mean of each seed's final control point.
    curves = [{"control": curve([(250, 0, .5, .1), (275, 10, .6, .2), (290, 16, .7, .3)]),
               "onpolicy": curve([(250, 0, .5, .1), (275, 8, .8, .1), (300, 16, .9, .2)]),
               "rl": curve([(250, 0, .5, .1), (275, 4, .5, .1), (300, 8, .5, .1)])},
              {"control": curve([(250, 0, .5, .1), (275, 12, .6, .2), (285, 17, .9, .5)]),
               "onpolicy": curve([(250, 0, .5, .1), (275, 10, .6, .1), (300, 20, .7, .6)]),
               "rl": curve([(250, 0, .5, .1), (275, 6, .5, .1), (300, 12, .5, .1)])}]
    for seed, c in enumerate(curves):
        _unit(tmp_path, "scarce", seed, acc)
        (tmp_path / "scarce" / f"seed-{seed}" / "summary.json").write_text(json.dumps({"curves": c}))
    report = Study(cfg, Path("study.yaml")).report()
    by_arm = {c["arm"]: c for c in report["curves"]}
    assert set(by_arm) == {"control", "onpolicy", "rl"}
    control, opd, rl = by_arm["control"], by_arm["onpolicy"], by_arm["rl"]
    assert control["target"] == pytest.approx({"think": 0.8, "no_think": 0.4})
    assert [p["step"] for p in control["points"]] == [250, 275]
    assert opd["points"][1] == {"step": 275, "flops": 9.0, "think": [pytest.approx(0.7), 0.6, 0.8],
                                "no_think": [pytest.approx(0.1), 0.1, 0.1]}
    assert opd["to_target"] == {"think": {"step": 300, "flops": 18.0}, "no_think": {"step": 300, "flops": 18.0}}
    assert rl["to_target"] == {"think": None, "no_think": None} and control["to_target"]["think"] is None
    text = (tmp_path / "report.md").read_text()
    assert "| scarce | onpolicy | 275 | 9 | 70.0 [60.0, 80.0] | 10.0 [10.0, 10.0] |" in text
    assert "think (target 80.0): step 300, 18 FLOPs" in text and "not reached" in text


def test_a_protocol_without_its_version_line_is_refused(tmp_path):
    protocol = tmp_path / "protocol.md"
    protocol.write_text("# A protocol\n\nVersion 2, but not in the form the study reads.\n")
    cfg = load_config(REPO / "configs/experiments/demo-arithmetic-cpu.yaml",
                      [f"run.dir={tmp_path}", f"study.protocol={protocol}"], check_files=False)
    with pytest.raises(ConfigError, match=r"protocol.md has no '\*\*Protocol version N\*\*' line"):
        Study(cfg, Path("study.yaml"))
