"""Cross-field checks of a merged JobConfig. Each error is a ValueError naming the keys."""

from __future__ import annotations

from pathlib import Path

from qwen3kd.config.schema import JobConfig, Precision
from qwen3kd.errors import ConfigError


def te_available() -> bool:
    # Transformer Engine raises RuntimeError (not ImportError) on a machine without CUDA.
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _check_model(m, key: str = "model") -> None:
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(
            f"{key}.num_key_value_heads={m.num_key_value_heads} must divide "
            f"{key}.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_experts:
        if not 0 < m.num_experts_per_tok <= m.num_experts:
            raise ConfigError(
                f"{key}.num_experts_per_tok={m.num_experts_per_tok} must be in 1..{key}.num_experts"
            )
        if m.moe_intermediate_size <= 0:
            raise ConfigError(f"{key}.moe_intermediate_size must be > 0 for an MoE model")
    elif m.num_experts_per_tok:
        raise ConfigError(f"{key}.num_experts_per_tok is set but {key}.num_experts is 0")


def _check_distillation(cfg: JobConfig, layout, check_files: bool) -> None:
    """The KD loss parameters are sane; the teacher's own layout fits its model and the world."""
    from qwen3kd.distributed.layout import teacher_layout
    from qwen3kd.losses.reference import check_kd_params

    k = cfg.kd
    try:
        check_kd_params(k.kind.value, k.temperature, k.beta, k.skew)
    except ValueError as e:
        raise ConfigError(f"kd: {e}") from None
    if not 0 <= k.alpha <= 1 or k.chunk < 1 or k.topk < 1:
        raise ConfigError("kd.alpha must be in [0, 1], kd.chunk and kd.topk >= 1")
    t = cfg.teacher
    if t is None:
        if cfg.eval.interval:
            raise ConfigError("eval.interval > 0 needs a teacher (evaluation reports KL)")
        return
    _check_model(t.model, "teacher.model")
    try:
        teacher_layout(cfg, layout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.wave_tokens is not None and t.wave_tokens < 1:
        raise ConfigError("teacher.wave_tokens must be >= 1 (or null: one wave per step)")
    # (`qwen3kd demo` fills teacher.load in; the trainer requires it and checks that it fits
    # teacher.model, which `generate` does not use.)
    if check_files and t.load and not Path(t.load).is_dir():
        raise ConfigError(f"teacher.load: directory not found: {t.load}")
    e, per = cfg.eval, cfg.train.micro_batch_size * layout.dp
    if e.interval and (not cfg.data.eval_path or cfg.data.kind.value != "chat"):
        raise ConfigError("eval.interval > 0 needs data.kind=chat and data.eval_path "
                          "(held-out conversations)")
    if e.interval and (e.samples % per or e.samples < per):
        raise ConfigError(f"eval.samples={e.samples} must be a multiple of train.micro_batch_size"
                          f" × data-parallel size = {per}")


def _check_train(cfg: JobConfig, dp: int) -> None:
    t = cfg.train
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.micro_batch_size × data-parallel size = {t.micro_batch_size} × {dp} must divide "
            f"train.global_batch_size={t.global_batch_size}"
        )
    if t.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}"
        )
    if t.steps < 0:
        raise ConfigError(f"train.steps must be >= 0, got {t.steps}")
    if t.precision is Precision.fp8 and not te_available():
        raise ConfigError(
            "train.precision=fp8 needs Transformer Engine (pip install 'qwen3kd[gpu]') and a CUDA GPU"
        )
    te = t.layer_impl.value == "te" or (t.layer_impl.value == "auto" and te_available())
    if te and cfg.data.kind.value == "chat" and cfg.data.pack:
        # TE attention takes packed samples as THD (cu_seqlens), not as a dense mask; until that
        # path exists, packing would let samples attend to each other there.
        raise ConfigError("data.pack=true with Transformer Engine layers is not supported yet: "
                          "set data.pack=false (or train.layer_impl=local)")
    o = cfg.optim
    if o.decay_steps is not None and o.decay_steps <= o.warmup_steps:
        raise ConfigError(f"optim.decay_steps={o.decay_steps} must be > optim.warmup_steps={o.warmup_steps}")
    if t.steps > 0 and o.warmup_steps >= t.steps and o.decay_steps is None:  # megatron: warmup < decay
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} must be < train.steps={t.steps}"
        )


def validate_data(cfg: JobConfig, check_files: bool = True) -> None:
    """The data.* keys (and, with check_files, the paths): all `qwen3kd prepare` needs checked."""
    if cfg.data.prepare_workers < 0 or cfg.data.prepare_shard_lines < 1:
        raise ConfigError(f"data.prepare_workers={cfg.data.prepare_workers} must be >= 0 and "
                          f"data.prepare_shard_lines={cfg.data.prepare_shard_lines} >= 1")
    if check_files:
        _check_paths(cfg)


def _check_paths(cfg: JobConfig) -> None:
    d = cfg.data
    from qwen3kd.config.schema import Phase

    # An on-policy-only run reads no training data: the student answers prompts.
    if d.kind.value in ("tokens", "chat") and (Phase.offpolicy in cfg.phases or cfg.teacher is None):
        if not d.path:
            raise ConfigError(f"data.kind={d.kind.value} needs data.path")
        if not Path(d.path).exists():
            raise ConfigError(f"data.path: not found: {d.path} (a JSONL file or a prepared folder)")
    if d.eval_path and not Path(d.eval_path).exists():
        raise ConfigError(f"data.eval_path: not found: {d.eval_path} (a JSONL file or a prepared folder)")
    for key, value in (("data.tokenizer", d.tokenizer),
                       ("teacher.tokenizer", cfg.teacher.tokenizer if cfg.teacher else None)):
        if value and not Path(value).is_dir():
            raise ConfigError(f"{key}: directory not found: {value}")
    if cfg.tracking.timeout_s <= 0:
        raise ConfigError("tracking.timeout_s must be > 0")
    if cfg.checkpoint.load and not Path(cfg.checkpoint.load).is_dir():
        raise ConfigError(f"checkpoint.load: directory not found: {cfg.checkpoint.load}")
    if cfg.resume not in ("never", "auto") and not (Path(cfg.resume) / "qwen3kd.json").is_file():
        raise ConfigError(f"resume: expected never, auto or a step checkpoint directory; "
                          f"{cfg.resume} is none of these (no qwen3kd.json in it)")
    c = cfg.checkpoint
    if c.interval < 0 or c.keep_last < 0:
        raise ConfigError("checkpoint.interval and checkpoint.keep_last must be >= 0")


# Head sizes vLLM's CPU attention supports (vllm/v1/attention/backends/cpu_attn.py, 0.32).
CPU_ENGINE_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_rollout(cfg: JobConfig, head_dim: int) -> None:
    """Sampling and engine settings (on-policy training and `qwen3kd generate`); `head_dim` is
    that of the model the engine runs."""
    import torch

    r = cfg.rollout
    if r.temperature <= 0 or not 0 < r.top_p <= 1 or r.top_k < 0:
        raise ConfigError("rollout.temperature must be > 0, rollout.top_p in (0, 1], rollout.top_k >= 0")
    if not 1 <= r.max_new_tokens < cfg.train.seq_length:
        raise ConfigError(f"rollout.max_new_tokens={r.max_new_tokens} must be in 1..train.seq_length"
                          f" − 1 = {cfg.train.seq_length - 1} (prompt and answer share a row)")
    if r.thinking_budget is not None and r.thinking_budget < 1:
        raise ConfigError("rollout.thinking_budget must be >= 1 (or null: no budget)")
    if "</think>" not in r.stop_thinking_text:
        raise ConfigError("rollout.stop_thinking_text must contain </think> (it closes the thinking)")
    if r.sync_interval < 1 or r.probe_prompts < 1 or r.tensor_parallel < 1 or r.sync_bucket_mb < 1:
        raise ConfigError("rollout.sync_interval, probe_prompts, tensor_parallel and sync_bucket_mb must be >= 1")
    if r.probe_tolerance is not None and r.probe_tolerance <= 0:
        raise ConfigError("rollout.probe_tolerance must be > 0 (or null: by engine dtype)")
    if not torch.cuda.is_available() and head_dim not in CPU_ENGINE_HEAD_DIMS:
        raise ConfigError(f"head_dim={head_dim}: vLLM on a CPU supports head sizes "
                          f"{', '.join(map(str, CPU_ENGINE_HEAD_DIMS))}")


def _check_phases(cfg: JobConfig, dp: int, check_files: bool = True) -> None:
    from qwen3kd.config.schema import OnPolicyObjective, Phase

    phases = list(cfg.phases)
    if not phases or len(set(phases)) != len(phases):
        raise ConfigError(f"phases must list each phase at most once, got {[p.value for p in phases]}")
    if phases == [Phase.onpolicy, Phase.offpolicy]:
        raise ConfigError("phases: offpolicy comes before onpolicy (the student first learns the "
                          "teacher's answers, then its own)")
    if Phase.onpolicy not in phases:
        return
    o = cfg.onpolicy
    if cfg.teacher is None:
        raise ConfigError("phases: onpolicy needs a teacher (it scores the student's answers)")
    if o.steps < 1:
        raise ConfigError("onpolicy.steps must be >= 1 when phases has onpolicy")
    if not o.prompts or (check_files and not Path(o.prompts).is_file()):
        raise ConfigError(f"onpolicy.prompts: file not found: {o.prompts}")
    if not 0 <= o.think_ratio <= 1:
        raise ConfigError(f"onpolicy.think_ratio must be in [0, 1], got {o.think_ratio}")
    batch = o.batch_size if o.batch_size is not None else cfg.train.global_batch_size
    if o.group_size < 1 or (o.objective is OnPolicyObjective.grpo and o.group_size < 2):
        raise ConfigError(f"onpolicy.group_size={o.group_size} must be >= 1 (>= 2 for "
                          f"onpolicy.objective=grpo: its baseline is the group's mean reward)")
    if batch < 1 or batch % (dp * o.group_size):
        raise ConfigError(f"onpolicy.batch_size={batch} must be a positive multiple of the "
                          f"data-parallel size {dp} × onpolicy.group_size={o.group_size} (a "
                          f"group's answers stay on one replica)")
    from qwen3kd.rollout.verifiers import VERIFIERS

    if o.verifier not in VERIFIERS:
        raise ConfigError(f"onpolicy.verifier={o.verifier!r}: not one of {', '.join(VERIFIERS)}")
    if o.grpo_eps <= 0:
        raise ConfigError(f"onpolicy.grpo_eps must be > 0, got {o.grpo_eps}")
    if not cfg.data.tokenizer and not cfg.checkpoint.load:
        raise ConfigError("phases: onpolicy renders prompts with the student's tokenizer: set "
                          "data.tokenizer (or checkpoint.load to a folder with tokenizer files)")
    check_rollout(cfg, cfg.model.head_dim)


def validate(cfg: JobConfig, world_size: int | None = None, check_files: bool = True):
    """Raise ConfigError (a ValueError) on the first inconsistency; return the parallel layout.
    Every rank runs it before any collective, so a bad config fails alike everywhere.
    `check_files=False` (--dry-run): the config and the layouts only, not the paths."""
    from qwen3kd.distributed.layout import ParallelLayout

    _check_model(cfg.model)
    try:
        layout = ParallelLayout.from_config(cfg.parallel, cfg.model, world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_train(cfg, layout.dp)
    validate_data(cfg, check_files)
    _check_distillation(cfg, layout, check_files)
    _check_phases(cfg, layout.dp, check_files)
    return layout
