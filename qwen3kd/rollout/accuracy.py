"""`qwen3kd eval`: models answer held-out prompts in each mode; graded against reference answers.

    qwen3kd eval CONFIG --model NAME=PATH [--model NAME=PATH …] [key=value …]

PATH is a Hugging Face folder or a Megatron checkpoint (a `qwen3kd convert` output or a training
checkpoint, exported to a Hugging Face folder under `<run.dir>/eval_models/NAME` first: vLLM runs
Hugging Face folders). The prompts (`accuracy.prompts`) are JSONL prompt lines with an "answer";
each is answered greedily in every mode of `accuracy.modes` (a line's own "mode" wins), with
`rollout.*` settings except temperature 0 and `accuracy.max_new_tokens`.

Per model and mode: `accuracy` (exact match of the last integer of the answer, the thinking
excluded, against the reference), `compliance` (the answer has the shape the mode asks for, as
`rollout/mode_compliance` in training), `think_tokens` (mean tokens inside `<think>…</think>`),
`response_tokens` (mean), `truncated` (share stopped by max_new_tokens). With `accuracy.samples`
= n > 0, each problem is also answered n times at temperature 1 and `pass_at_k` holds, for each k
of `accuracy.pass_k`, the unbiased estimator 1 − C(n−c, k)/C(n, k) (c of the n correct; Chen et
al. 2021) averaged over problems. Prompt lines with a "stratum" are also reported on their own,
under "MODE/STRATUM" (e.g. "think/hard"). Written atomically to `accuracy.output` as JSON, with
every greedy answer in `<output stem>.samples/NAME.jsonl` (with `sampled_correct`, the count c).

Models of one architecture share one engine: the first starts it, the next ones are pushed into
it (`load_weights`), which is much cheaper than a new vLLM start.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import replace
from pathlib import Path

from qwen3kd.config.schema import JobConfig, Mode
from qwen3kd.errors import ConfigError
from qwen3kd.files import write_text_atomic
from qwen3kd.rollout.engine import Request, Rollout
from qwen3kd.rollout.prompts import Prompt, load_prompts, render_prompt

log = logging.getLogger(__name__)

_INT = re.compile(r"-?\d+")
# config.json fields that do not change what the model computes.
_NOT_ARCHITECTURE = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache"}


def final_answer(answer_text: str) -> str | None:
    """The last integer of the answer text (the thinking excluded); None when it has none."""
    found = _INT.findall(answer_text)
    return found[-1] if found else None


def answer_text(tok, r: Rollout, think_close: int) -> str:
    """The answer after the thinking, end-of-turn and special tokens dropped."""
    ids = r.response_ids
    if think_close in ids:
        ids = ids[len(ids) - ids[::-1].index(think_close):]
    return tok.decode(ids, skip_special_tokens=True)


def graded_answer(tok, r: Rollout, think_close: int) -> str | None:
    """What is graded: the last integer of the answer, the thinking excluded."""
    return final_answer(answer_text(tok, r, think_close))


def think_tokens(r: Rollout, think: tuple[int, int]) -> int:
    """Tokens between the answer's `<think>` and `</think>` (to its end when unclosed)."""
    ids, (open_id, close_id) = r.response_ids, think
    if open_id not in ids:
        return 0
    start = ids.index(open_id) + 1
    end = ids.index(close_id, start) if close_id in ids[start:] else len(ids)
    return end - start


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k answers drawn without replacement from n, c of them correct, is
    correct) = 1 − C(n−c, k)/C(n, k), as a product (no large binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def grade(tok, prompts: list[tuple[Prompt, Mode]], rollouts: list[Rollout],
          sampled: list[list[Rollout]] | None = None, ks: list[int] = ()) -> tuple[dict, list[dict]]:
    """Metrics per mode, per mode and stratum and overall, and one record per greedy answer;
    `sampled` (n answers per prompt at T = 1) adds pass@k for each k of `ks`."""
    from qwen3kd.rollout.verifiers import Grader
    from qwen3kd.trainer.onpolicy import compliant

    g = Grader.of(tok)
    think, empty_block = g.think, g.empty_block
    records, sums = [], {}
    for (p, mode), r in zip(prompts, rollouts, strict=True):
        got = graded_answer(tok, r, think[1])
        rec = {"prompt_line": p.line, "mode": mode.value, "reference": p.answer, "answer": got,
               "correct": got == p.answer, "compliant": compliant(r, think, empty_block),
               "think_tokens": think_tokens(r, think), "response_tokens": len(r.response_ids),
               "truncated": r.finish_reason == "length", "stratum": p.stratum,
               "response": tok.decode(r.response_ids, skip_special_tokens=False)}
        passes = {}
        if sampled is not None:
            answers = sampled[len(records)]
            rec["sampled_correct"] = c = sum(graded_answer(tok, s, think[1]) == p.answer
                                             for s in answers)
            passes = {str(k): pass_at_k(len(answers), c, k) for k in ks}
        records.append(rec)
        keys = [mode.value, "all"] + ([f"{mode.value}/{p.stratum}"] if p.stratum else [])
        for key in keys:
            s = sums.setdefault(key, {"n": 0, "correct": 0, "compliant": 0, "think_tokens": 0,
                                      "response_tokens": 0, "truncated": 0, "pass_at_k": {}})
            s["n"] += 1
            for k in ("correct", "compliant", "think_tokens", "response_tokens", "truncated"):
                s[k] += rec[k]
            for k, v in passes.items():
                s["pass_at_k"][k] = s["pass_at_k"].get(k, 0.0) + v
    metrics = {}
    for key, s in sums.items():
        n = s["n"]
        metrics[key] = {"n": n, "accuracy": s["correct"] / n, "compliance": s["compliant"] / n,
                        "think_tokens": s["think_tokens"] / n,
                        "response_tokens": s["response_tokens"] / n, "truncated": s["truncated"] / n}
        if s["pass_at_k"]:
            metrics[key]["pass_at_k"] = {k: v / n for k, v in s["pass_at_k"].items()}
    return metrics, records


# ---- models ---------------------------------------------------------------------------------
def as_hf_folders(models: dict[str, Path], work: Path) -> dict[str, Path]:
    """A Hugging Face folder per model: the path itself, or its export from a Megatron checkpoint
    (one `qwen3kd convert` child process for all of them: converting sets up torch.distributed
    and megatron's CPU patches in the process that runs it, which the engine here must not
    inherit; one process pays the imports once, not once per checkpoint)."""
    import shutil
    import subprocess
    import sys

    folders, pairs = {}, []
    for name, path in models.items():
        if (path / "config.json").is_file():
            folders[name] = path
            continue
        if not path.is_dir():
            raise ConfigError(f"--model {name}={path}: no such directory")
        out = folders[name] = work / name
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        pairs += [str(path), str(out)]
    if pairs:
        cmd = [sys.executable, "-m", "qwen3kd.cli", "convert", *pairs, "--to", "hf"]
        job = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if job.returncode:
            # Pairs convert in order: the first export missing is the one that failed.
            failed = next((f"{n}={p}" for n, p in models.items() if folders[n] == work / n
                           and not folders[n].is_dir()), " ".join(pairs[::2]))
            raise ConfigError(f"--model {failed}: export to Hugging Face failed: "
                              f"{(job.stderr.strip().splitlines() or ['?'])[-1]}")
    return folders


def architecture(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    return json.dumps({k: v for k, v in sorted(cfg.items()) if k not in _NOT_ARCHITECTURE})


def safetensors_weights(folder: Path):
    from safetensors.torch import load_file

    for f in sorted(folder.glob("*.safetensors")):
        yield from load_file(f).items()


# ---- the command ----------------------------------------------------------------------------
def check_accuracy(cfg: JobConfig) -> list[Prompt]:
    a = cfg.accuracy
    if not a.prompts:
        raise ConfigError("accuracy.prompts is not set (JSONL prompts with an 'answer')")
    prompts = load_prompts(a.prompts)
    missing = [p.line for p in prompts if p.answer is None]
    if missing:
        raise ConfigError(f"accuracy.prompts: {a.prompts}:{missing[0]}: no 'answer' "
                          f"({len(missing)} lines without one)")
    if a.max_new_tokens < 1:
        raise ConfigError(f"accuracy.max_new_tokens must be >= 1, got {a.max_new_tokens}")
    if a.samples < 0:
        raise ConfigError(f"accuracy.samples must be >= 0, got {a.samples}")
    if a.samples and (not a.pass_k or any(not 1 <= k <= a.samples for k in a.pass_k)):
        raise ConfigError(f"accuracy.pass_k={list(a.pass_k)}: each k must be in 1..accuracy.samples"
                          f"={a.samples}")
    return prompts


def run_eval(cfg: JobConfig, models: dict[str, Path], engine_factory=None) -> dict:
    """Evaluate every model; returns {name: {mode: metrics}} (also written to accuracy.output)."""
    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.rollout.vllm_engine import VllmEngine

    prompts = check_accuracy(cfg)
    if not models:
        raise ConfigError("qwen3kd eval: no --model NAME=PATH given")
    a, work = cfg.accuracy, Path(cfg.run.dir) / "eval_models"
    folders = as_hf_folders({name: Path(p) for name, p in models.items()}, work)
    tok_dir = Path(a.tokenizer) if a.tokenizer else next(iter(folders.values()))
    tok = load_tokenizer(tok_dir)
    from omegaconf import OmegaConf

    rcfg = replace(OmegaConf.to_object(cfg.rollout), temperature=0.0, top_p=1.0, top_k=0, thinking_budget=a.thinking_budget,
                   max_new_tokens=a.max_new_tokens)
    asked = [(p, m) for p in prompts for m in ([p.mode] if p.mode else list(a.modes))]
    requests = [Request(render_prompt(tok, p.messages, m), m, seed=i) for i, (p, m) in enumerate(asked)]
    # pass@k: n answers per problem at T = 1, seeded by (problem, sample): the same draws for
    # every model, so models are compared on common random numbers.
    n = a.samples
    draws = [Request(q.prompt_ids, q.mode, seed=len(requests) + i * n + j, temperature=1.0)
             for i, q in enumerate(requests) for j in range(n)]
    max_len = max(len(r.prompt_ids) for r in requests) + a.max_new_tokens
    out = Path(a.output)
    results, samples = {}, out.with_name(out.stem + ".samples")
    groups: dict[str, list[str]] = {}
    for name, folder in folders.items():
        groups.setdefault(architecture(folder), []).append(name)
    start = time.perf_counter()
    for names in groups.values():
        make = engine_factory or (lambda f: VllmEngine(f, tok, rcfg, max_len, cfg.data.end_of_turn,
                                                       in_process=True))
        engine = make(folders[names[0]])
        try:
            for k, name in enumerate(names):
                if k:
                    engine.load_weights(safetensors_weights(folders[name]))
                greedy = engine.generate(requests)
                sampled = None
                if n:
                    flat = engine.generate(draws)
                    sampled = [flat[i * n: (i + 1) * n] for i in range(len(requests))]
                metrics, records = grade(tok, asked, greedy, sampled, list(a.pass_k))
                results[name] = metrics
                samples.mkdir(parents=True, exist_ok=True)
                write_text_atomic(samples / f"{name}.jsonl",
                                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                log.info("%s: %s", name, "; ".join(
                    f"{m}: accuracy {v['accuracy']:.3f}, compliance {v['compliance']:.3f}, "
                    f"thinking {v['think_tokens']:.1f} tokens" for m, v in metrics.items() if m != "all"))
                done, elapsed = len(results), time.perf_counter() - start
                log.info("model %d/%d (%s) evaluated, ETA %.0f s", done, len(folders), name,
                         elapsed / done * (len(folders) - done))
        finally:
            engine.close()
    results = {name: results[name] for name in models}  # the order given
    write_text_atomic(out, json.dumps(results, indent=1) + "\n")
    log.info("wrote %s", out)
    return results
