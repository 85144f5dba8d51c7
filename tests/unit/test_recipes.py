"""The Qwen3 report's teacher → student pairs (configs/experiments/opd-*.yaml) pass `--dry-run` at
their node counts: both layouts and the teacher's memory per rank, which must fit next to the
student on an 80 GB GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qwen3kd.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiments"
# recipe: (world size, the teacher's layout line)
RECIPES = {
    "opd-qwen3-30b-a3b-from-235b-a22b-32n8g.yaml": (256, "tp=4 pp=2 dp=32 ep=32 etp=1"),
    "opd-qwen3-8b-from-235b-a22b-32n8g.yaml": (256, "tp=4 pp=2 dp=32 ep=32 etp=1"),
    "opd-qwen3-1.7b-from-32b-4n8g.yaml": (32, "tp=4 pp=1 dp=8 ep=1"),
    "opd-qwen3-0.6b-from-32b-2n8g.yaml": (16, "tp=4 pp=1 dp=4 ep=1"),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_passes_dry_run(recipe, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", str(EXPERIMENTS / recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    world, teacher = RECIPES[recipe]
    assert f"layout: world={world} " in out and f"teacher layout: world={world} {teacher}" in out
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert len(rows) == min(world, 64)
    assert all(float(r[1]) > 0 for r in rows)  # every rank holds a part of the teacher
    largest = float(re.search(r"largest: rank \d+, ([\d.]+) GiB", out).group(1))
    assert 1 < largest < 40, largest  # GiB: the student and activations need the rest


def test_235b_teacher_per_rank_weights_at_tp4_pp2_ep32(monkeypatch):
    """Qwen3-235B-A22B at TP=4 × PP=2 × EP=32 (expert TP 1), by hand: 47 layers a stage, each
    attention 4096·(64·128 + 2·4·128) + 64·128·4096 = 71,303,168 split by TP=4, QK-norms 2·128 and
    layer norms 2·4096 replicated, 128 experts of 3·4096·1536 split by EP=32, the router 4096·128
    replicated; the embedding (151,936 × 4096, by TP) on the first stage, the final norm on the
    last, no output layer of its own."""
    from qwen3kd.config.loader import load_config
    from qwen3kd.distributed.layout import ParallelLayout, teacher_layout
    from qwen3kd.models.params import rank_params

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config(EXPERIMENTS / "opd-qwen3-8b-from-235b-a22b-32n8g.yaml", check_files=False)
    t = teacher_layout(cfg, ParallelLayout.from_config(cfg.parallel, cfg.model))
    layer = 71_303_168 // 4 + 256 + 8192 + 128 * 3 * 4096 * 1536 // 32 + 4096 * 128
    first, last = 0, t.world_size - 1
    assert (t.coords(first)["pp"], t.coords(last)["pp"]) == (0, 1)
    assert rank_params(cfg.teacher.model, t, first, output_layer=False) == 47 * layer + 151_936 * 4096 // 4
    assert rank_params(cfg.teacher.model, t, last, output_layer=False) == 47 * layer + 4096
