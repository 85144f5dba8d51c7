"""Benchmark: the data path at scale — `qwen3kd prepare` throughput, and the trainer's start-up
(launch to its first step, peak resident memory) against the number of conversations.

    .venv/bin/python tools/bench_data.py --sizes 1000,100000,1000000 --json OUT

Data: synthetic arithmetic conversations in both modes (qwen3kd/toy.py), rendered with the toy
tokenizer's Qwen3 chat template; every size is a prefix of the same stream, so the samples of the
smaller sets are in the larger ones. Under BENCH_DIR (default runs/bench-data), kept between runs.

  prepare   per size, `qwen3kd prepare` from scratch (`--workers`, default one per core): the
            whole process's seconds, conversations/s and tokens/s, and its peak memory.
  startup   per size, a 1-step off-policy run of the tiny smoke config (configs/smoke/
            offpolicy-tiny.yaml at TP=1, one process, MLflow on, no held-out set) on the
            prepared folder, in a fresh run folder: seconds from launch to the first step's log
            line, and the peak resident memory of the trainer process. A first run builds the
            packing index; `--repeats` runs follow, and their median is reported.

Each command is a whole process, timed from outside; the machine is shared, so quote medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_data")
CONFIG = ROOT / "configs" / "smoke" / "offpolicy-tiny.yaml"
FIRST_STEP = re.compile(r"step 1/1\b")


def make_conversations(path: Path, n: int, seed: int = 0) -> Path:
    """n synthetic conversations, alternating think / no_think, written once (cached by name)."""
    from qwen3kd.toy import conversation

    if path.is_file() and sum(1 for _ in open(path)) == n:
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            f.write(json.dumps(conversation(rng, "think" if i % 2 == 0 else "no_think")) + "\n")
    os.replace(tmp, path)
    return path


def _children_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_timed(cmd: list[str], log_path: Path, first_line: re.Pattern | None = None) -> dict:
    """Run `cmd`, its output to `log_path`; seconds to the first line matching `first_line` and
    in all, and the process's peak RSS (a fresh interpreter per call, so RUSAGE_CHILDREN's maximum
    is this child's when it is the largest so far: each measurement runs in its own helper)."""
    helper = [sys.executable, "-c", _HELPER, json.dumps(cmd), str(log_path),
              first_line.pattern if first_line else ""]
    out = subprocess.run(helper, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed; its log: {log_path}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


# Runs in a fresh interpreter, so that RUSAGE_CHILDREN holds only the measured command.
_HELPER = r"""
import json, re, resource, subprocess, sys, time
cmd, log_path, pattern = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
first = None
start = time.perf_counter()
with open(log_path, "w") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True, errors="replace") as p:
    for line in p.stdout:
        f.write(line)
        if pattern and first is None and re.search(pattern, line):
            first = time.perf_counter() - start
total = time.perf_counter() - start
if p.returncode:
    sys.exit(f"exit {p.returncode}")
print(json.dumps({"first_s": first, "total_s": total,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def prepare(data: Path, cache: Path, workers: int | None, extra: list[str]) -> dict:
    """`qwen3kd prepare` of `data` into a fresh `cache`: seconds, rates, peak RSS, the folder."""
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "qwen3kd.cli", "prepare", str(CONFIG), f"data.path={data}",
           "data.eval_path=null", f"data.cache={cache}", *extra]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    log_path = cache.with_suffix(".log")
    r = run_timed(cmd, log_path)
    folder = Path(re.search(r"data.path: .* → (.*) \(\d+ rows\)", log_path.read_text())[1])
    counts = json.loads((folder / "manifest.json").read_text())["counts"]
    out = {"seconds": r["total_s"], "conversations_per_s": counts["lines"] / r["total_s"],
           "tokens_per_s": counts["tokens"] / r["total_s"], "tokens": counts["tokens"],
           "samples": counts["samples"], "peak_rss_mb": r["peak_rss_mb"], "folder": str(folder)}
    log.info("%s: prepared in %.1f s (%.0f conversations/s, %.0f tokens/s), peak RSS %.0f MB", data.name,
             r["total_s"], out["conversations_per_s"], out["tokens_per_s"], r["peak_rss_mb"])
    return out


def startup(data: Path, work: Path, repeats: int, extra: list[str]) -> dict:
    """Launch-to-first-step of a 1-step run on `data`; the first run builds what is cached."""
    cmd = [sys.executable, "-m", "qwen3kd.cli", "train", str(CONFIG), "parallel.tensor=1", "train.steps=1",
           f"data.path={data}", "data.eval_path=null", "eval.interval=0", "optim.warmup_steps=0", "checkpoint.save_final=false",
           f"run.dir={work}", *extra]
    import shutil

    runs = []
    for i in range(repeats + 1):
        shutil.rmtree(work, ignore_errors=True)  # a fresh run each time (its MLflow store too)
        r = run_timed(cmd, work.with_suffix(f".log{i}"), FIRST_STEP)
        if r["first_s"] is None:
            raise RuntimeError(f"no first step in {work.with_suffix(f'.log{i}')}")
        runs.append(r)
        log.info("%s: run %d: first step after %.1f s, peak RSS %.0f MB", data.name, i, r["first_s"],
                 r["peak_rss_mb"])
    timed = runs[1:] or runs
    return {"first_run": runs[0], "runs": timed,
            "first_step_s": statistics.median(r["first_s"] for r in timed),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in timed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,100000,1000000")
    p.add_argument("--repeats", type=int, default=3, help="timed start-ups per size (after the first)")
    p.add_argument("--workers", type=int, help="qwen3kd prepare --workers (default: one per core)")
    p.add_argument("--json", type=Path)
    args, extra = p.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bench = Path(os.environ.get("BENCH_DIR", ROOT / "runs" / "bench-data")).resolve()
    bench.mkdir(parents=True, exist_ok=True)
    if not (ROOT / "runs" / "toy-assets" / "tokenizer").is_dir():
        subprocess.run([sys.executable, "-m", "qwen3kd.toy", str(ROOT / "runs" / "toy-assets")], check=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"sizes": sizes, "cpus": os.cpu_count(), "prepare": {}, "startup": {}}
    for n in sizes:
        data = make_conversations(bench / f"conv-{n}.jsonl", n)
        result["prepare"][n] = prepare(data, bench / f"prepared-{n}", args.workers, extra)
        folder = Path(result["prepare"][n]["folder"])
        result["startup"][n] = startup(folder, bench / f"run-{n}", args.repeats, extra)
        log.info("%d conversations: first step after %.1f s (median of %d), peak RSS %.0f MB", n,
                 result["startup"][n]["first_step_s"], len(result["startup"][n]["runs"]),
                 result["startup"][n]["peak_rss_mb"])
    first, last = str(sizes[0]), str(sizes[-1])
    s = {str(k): v for k, v in result["startup"].items()}
    result["ratios"] = {f"first_step_{last}_over_{first}": s[last]["first_step_s"] / s[first]["first_step_s"],
                        f"peak_rss_{last}_over_{first}": s[last]["peak_rss_mb"] / s[first]["peak_rss_mb"]}
    log.info("start-up at %s vs %s conversations: first step %.2f×, peak RSS %.2f×", last, first,
             *result["ratios"].values())
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
