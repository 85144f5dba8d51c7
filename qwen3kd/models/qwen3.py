"""Qwen3 / Qwen3-MoE presets → megatron-core GPTModel.

Qwen3 is a pre-norm decoder with RMSNorm, per-head RMSNorm on q and k (QK-norm), grouped-query
attention without biases, RoPE (θ = 1e6), SwiGLU MLPs, and (MoE) top-k softmax routing whose top-k
weights are renormalised (`norm_topk_prob`). Megatron's "top-k then softmax over the k" routing is
the same function as "softmax then top-k then renormalise", so `moe_router_pre_softmax=False`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from qwen3kd.config.schema import JobConfig, LayerImpl, ModelConfig, Precision, RouterMode
from qwen3kd.distributed.layout import ParallelLayout

log = logging.getLogger(__name__)


def transformer_config(cfg: JobConfig, layout: ParallelLayout):
    """The megatron TransformerConfig for the model of `cfg` under `layout`."""
    from megatron.core.transformer import TransformerConfig

    m: ModelConfig = cfg.model
    bf16 = cfg.train.precision in (Precision.bf16, Precision.fp8)
    on_gpu = torch.cuda.is_available()
    moe = {}
    if m.num_experts:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.num_experts_per_tok,
            moe_ffn_hidden_size=m.moe_intermediate_size,
            moe_router_pre_softmax=not m.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss" if m.router is RouterMode.aux_loss else "none",
            moe_aux_loss_coeff=m.router_aux_loss_coef if m.router is RouterMode.aux_loss else 0.0,
            moe_token_dispatcher_type="alltoall",
            moe_router_dtype="fp32",
            # Grouped GEMM needs the CUDA grouped_gemm package (or TE); plain per-expert MLPs else.
            moe_grouped_gemm=on_gpu and _use_te(cfg),
        )
    return TransformerConfig(
        num_layers=m.num_hidden_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.intermediate_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_key_value_heads,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        qk_layernorm=m.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_in_first_pipeline_stage=cfg.parallel.first_stage_layers,
        num_layers_in_last_pipeline_stage=cfg.parallel.last_stage_layers,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        fp8="hybrid" if cfg.train.precision is Precision.fp8 else None,
        use_cpu_initialization=not on_gpu,
        # Loss is a sum over tokens; the schedule divides by the global token count (DESIGN.md).
        calculate_per_token_loss=True,
        # Fusions that need TE / Apex / torch.compile stay off unless TE is in use.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **moe,
    )


def _use_te(cfg: JobConfig) -> bool:
    from qwen3kd.config.validate import te_available

    impl = cfg.train.layer_impl
    if impl is LayerImpl.te and not te_available():
        raise ValueError("train.layer_impl=te needs Transformer Engine (the gpu extra) and CUDA")
    return impl is LayerImpl.te or (impl is LayerImpl.auto and te_available())


def layer_spec(cfg: JobConfig):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    n_exp = cfg.model.num_experts or None
    if _use_te(cfg):
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=n_exp, moe_grouped_gemm=n_exp is not None, qk_layernorm=cfg.model.qk_norm
        )
    return specs.get_gpt_layer_local_spec(
        num_experts=n_exp, moe_grouped_gemm=False, qk_layernorm=cfg.model.qk_norm,
        normalization="RMSNorm",
    )


def build_model(cfg: JobConfig, layout: ParallelLayout, meta: bool = False, pgc=None,
                initialize: bool = True) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), on the process groups `pgc` (a
    ProcessGroupCollection; None: megatron's globals, i.e. the student's layout). Needs
    `layout.init()` first. `meta`: parameters without storage (shapes and names only), for
    streaming conversion. `initialize=False`: no random initialisation (weights loaded next)."""
    if pgc is None:
        pgc = ParallelLayout.groups()
    if meta:
        with torch.device("meta"):
            tcfg = transformer_config(cfg, layout)
            tcfg.use_cpu_initialization, tcfg.perform_initialization = True, False
            return _build(cfg, layout, tcfg, pgc, to_gpu=False)
    tcfg = transformer_config(cfg, layout)
    tcfg.perform_initialization = initialize
    return _build(cfg, layout, tcfg, pgc, to_gpu=torch.cuda.is_available())


def _build(cfg: JobConfig, layout: ParallelLayout, tcfg, pgc, to_gpu: bool) -> list[torch.nn.Module]:
    from megatron.core.models.gpt import GPTModel

    spec = layer_spec(cfg)
    m = cfg.model
    stage, stages, vpp = pgc.pp.rank(), pgc.pp.size(), layout.vpp or 1
    chunks = []
    for vp in range(vpp):
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=m.vocab_size,
            max_sequence_length=m.max_position_embeddings,
            # The stage from the model's own pipeline group: the teacher's is not megatron's global.
            pre_process=stage == 0 and vp == 0,
            post_process=stage == stages - 1 and vp == vpp - 1,
            share_embeddings_and_output_weights=m.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(m.rope_theta),
            pg_collection=pgc,
            vp_stage=vp if layout.vpp else None,
        )
        if m.num_experts and m.router is RouterMode.frozen:
            for name, p in model.named_parameters():
                if ".router." in name:
                    p.requires_grad_(False)
        if to_gpu:
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
