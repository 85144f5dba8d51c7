"""What `qwen3kd demo` prints under its run: the result table (markdown) and the comparisons in
words, both from its summary.json (qwen3kd/demo/pipeline.py)."""

from __future__ import annotations

from qwen3kd.demo.pipeline import MODES


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def verdict(summary: dict) -> str:
    """The comparisons, in words, under the table."""
    c, models, lines = summary["claims"], summary["models"], []
    for other, name in (("rl", "RL"), ("control", "control")):
        for mode, p in c[f"onpolicy_vs_{other}_paired"].items():
            diff = models["onpolicy"][mode]["accuracy"] - models[other][mode]["accuracy"]
            lines.append(f"{mode}: on-policy distillation − {name} = {diff:+.1%} (problems only "
                         f"on-policy solves: {p['onpolicy_only']}, only {name}: {p[f'{other}_only']}; "
                         f"McNemar z = {p['z']:+.2f})")
    for arm, name in (("onpolicy", "on-policy distillation"), ("rl", "RL"), ("control", "control")):
        changes = "; ".join(f"{mode} " + ", ".join(f"pass@{k} {v:+.1%}" for k, v in ks.items())
                            for mode, ks in c["pass_at_k_change"][arm].items() if ks)
        if changes:
            lines.append(f"{name} vs the off-policy start: {changes}")
    lines.append(f"RL spent {c['rl_flops_over_onpolicy']:.2f}× the FLOPs of on-policy distillation "
                 f"(seconds: RL {summary['arms']['rl']['seconds']:.0f}, on-policy "
                 f"{summary['arms']['onpolicy']['seconds']:.0f}, control {summary['arms']['control']['seconds']:.0f})")
    lines.append("gap to the teacher after on-policy distillation: " + ", ".join(
        f"{mode} {gap:.1%}" for mode, gap in c["onpolicy_gap_to_teacher"].items()))
    lines.append("on-policy mode compliance ≥ 99 % in both modes: "
                 + ("yes" if c["onpolicy_compliance_at_least_99pct"] else "no"))
    return "\n".join(lines) + "\n"


def table(summary: dict) -> str:
    """The demo's result table (markdown): greedy accuracy, pass@k at T = 1 and the hard stratum
    per mode, compliance, thinking length, and the training compute of each model's own stage
    (an arm's: from the off-policy checkpoint on)."""
    steps, models, compute = summary["steps"], summary["models"], summary["compute"]
    ks = sorted({k for r in models.values() for k in r["think"].get("pass_at_k", {})}, key=int)
    ks = [k for k in ks if k in (ks[0], ks[-1])] if ks else []  # the smallest and the largest
    head = ["model", "acc think", "acc no_think", *[f"pass@{k} {mode}" for mode in MODES for k in ks],
            "acc think, ≥2 carries", "compliance think", "compliance no_think", "thinking tokens",
            "train FLOPs", "train s"]
    label = {"teacher": f"teacher ({steps['teacher']} steps on ground truth)",
             "student-before": "student before distillation",
             "offpolicy": f"off-policy distillation ({steps['offpolicy']} steps)",
             "control": f"control: off-policy (+{steps['control']} steps)",
             "onpolicy": f"on-policy distillation (+{steps['onpolicy']} steps)",
             "onpolicy_fkl": f"on-policy distillation, forward KL (+{steps.get('onpolicy_fkl')} steps)",
             "rl": f"RL, GRPO (+{steps['rl']} steps)"}
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m, r in models.items():  # the variant's models, in the pipeline's order
        c = compute.get(m)
        cells = [label[m], _pct(r["think"]["accuracy"]), _pct(r["no_think"]["accuracy"]),
                 *[_pct(r[mode].get("pass_at_k", {}).get(k)) for mode in MODES for k in ks],
                 _pct(r.get("think/hard", {}).get("accuracy")),
                 _pct(r["think"]["compliance"]), _pct(r["no_think"]["compliance"]),
                 f"{r['think']['think_tokens']:.1f}",
                 f"{c['flops']:.2e}" if c else "–",
                 ("cached" if c["seconds"] is None else f"{c['seconds']:.0f}") if c else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
