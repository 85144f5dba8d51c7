"""Benchmark: the naive KD loss against ours (fused with the output layer, chunked), fwd + bwd.

    .venv/bin/python tools/bench_kd_loss.py --vocab 151936 --hidden 1024 --tokens 1024,4096 --json OUT
    .venv/bin/python tools/bench_kd_loss.py --ours-only --tokens 16384 --json OUT

Both variants get the same inputs: the student's final hidden states and output weight, the
teacher's hidden states and output weight (fp32). Naive: student and teacher logits as full
[tokens × V] fp32 tensors, log_softmax of both, forward KL, backward. Ours: `fused_kd_loss`.
Each measurement runs in a fresh subprocess: peak memory above the inputs is the process's peak
resident set minus its resident set once the inputs exist (CPU; on CUDA the allocator's peak);
time is the median of `--repeat` forward + backward passes after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("bench_kd_loss")
ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _child(variant: str, tokens: int, vocab: int, hidden: int, repeat: int, chunk: int) -> dict:
    import resource
    import statistics
    import time

    import torch

    from qwen3kd.losses.fused import KDSpec, fused_kd_loss
    from qwen3kd.memory import return_freed_memory

    return_freed_memory()  # the same allocator policy for both variants
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    th = torch.randn(tokens, hidden, generator=g)
    tw = torch.randn(vocab, hidden, generator=g) * 0.02
    mask = torch.ones(tokens, dtype=torch.bool)
    cuda = torch.cuda.is_available()
    if cuda:
        h, w, th, tw, mask = (x.cuda() for x in (h, w, th, tw, mask))
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / MB if cuda else _rss_mb()

    def step() -> float:
        h.grad = w.grad = None
        if variant == "naive":
            log_q = torch.log_softmax(h @ w.t(), -1)  # [N, V]
            log_p = torch.log_softmax(th @ tw.t(), -1)
            loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        else:
            loss, _ = fused_kd_loss(h, w, mask, KDSpec("forward_kl", chunk=chunk),
                                    teacher_hidden=th, teacher_weight=tw)
        loss.backward()
        return float(loss)

    times, value = [], None
    for i in range(repeat + 1):
        start = time.perf_counter()
        value = step()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first pass is a warm-up
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / MB if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "tokens": tokens, "peak_mb": peak - base,
            "median_s": statistics.median(times), "loss": value}


def _measure(variant: str, tokens: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--vocab",
           str(args.vocab), "--hidden", str(args.hidden), "--repeat", str(args.repeat),
           "--chunk", str(args.chunk)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"variant": variant, "tokens": tokens, "error": p.stderr.strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chunk", type=int, default=192)
    p.add_argument("--ours-only", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=["naive", "ours"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = _child(args.child, int(args.tokens), args.vocab, args.hidden, args.repeat, args.chunk)
        sys.stdout.write(json.dumps(res) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        row = {"tokens": tokens, "ours": _measure("ours", tokens, args)}
        if not args.ours_only:
            row["naive"] = _measure("naive", tokens, args)
            a, b = row["ours"], row["naive"]
            if "error" not in a and "error" not in b:
                row["memory_ratio"] = a["peak_mb"] / b["peak_mb"]
                row["time_ratio"] = a["median_s"] / b["median_s"]
                row["loss_rel_diff"] = abs(a["loss"] - b["loss"]) / abs(b["loss"])
        rows.append(row)
        log.info("%s", json.dumps(row))
    result = {"vocab": args.vocab, "hidden": args.hidden, "repeat": args.repeat,
              "chunk": args.chunk, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
