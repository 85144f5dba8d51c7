"""ParallelLayout: the one owner of the parallel sizes and of process-group initialisation.

Sizes are checked against the model before any tensor exists (like torchtitan's
`ParallelDims._validate`); a bad layout is a ValueError naming the config key. `init()` is the only
caller of `parallel_state.initialize_model_parallel` in the project.

Rank order is megatron's default "tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent (they share
a node's NVLink), pipeline stages are the outermost split. Expert groups are carved out of the
data-parallel ranks: world = tp·cp·dp·pp = etp·ep·edp·pp.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

from qwen3kd.config.schema import Backend, ModelConfig, ParallelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    vpp: int | None
    sequence_parallel: bool
    distributed_optimizer: bool
    backend: Backend

    @property
    def edp(self) -> int:
        """Expert data-parallel size: replicas of each expert shard."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @classmethod
    def from_config(
        cls, par: ParallelConfig, model: ModelConfig, world_size: int | None = None
    ) -> ParallelLayout:
        """Check `par` against `model` and the world size; raise ValueError naming the key."""
        env = os.environ.get("WORLD_SIZE")
        launched = world_size or (int(env) if env else None)
        if par.world_size is not None and launched is not None and par.world_size != launched:
            raise ValueError(
                f"parallel.world_size={par.world_size} but the launcher started {launched} processes"
            )
        world = par.world_size or launched or 1
        for key in ("tensor", "pipeline", "expert", "context"):
            if getattr(par, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(par, key)}")
        if par.context != 1:
            raise ValueError("parallel.context > 1 (context parallelism) is not supported yet")
        tp, pp, ep = par.tensor, par.pipeline, par.expert
        etp = par.expert_tensor if par.expert_tensor is not None else tp
        if world % (tp * pp):
            raise ValueError(
                f"world size {world} is not divisible by parallel.tensor × parallel.pipeline "
                f"= {tp} × {pp}"
            )
        dp = world // (tp * pp)
        _check_heads(tp, model)
        _check_pipeline(par, model)
        _check_experts(par, model, tp, dp, ep, etp)
        if par.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tensor > 1")
        if model.num_experts and tp > 1 and not par.sequence_parallel:
            # MoE layers with TP expect sequence-parallel input in training (megatron MoELayer).
            raise ValueError(
                "an MoE model with parallel.tensor > 1 needs parallel.sequence_parallel=true"
            )
        return cls(
            world_size=world, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, vpp=par.virtual_pipeline,
            sequence_parallel=par.sequence_parallel,
            distributed_optimizer=par.distributed_optimizer, backend=par.backend,
        )

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's position in each group (megatron order tp-cp-ep-dp-pp)."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        # Expert view of the same ranks: etp-ep-edp-pp.
        ep_rank = (rank // self.etp) % self.ep
        return {"tp": tp_rank, "dp": dp_rank, "pp": pp_rank, "ep": ep_rank}

    def describe(self) -> str:
        head = (
            f"world={self.world_size} tp={self.tp} pp={self.pp}"
            f"{f' vpp={self.vpp}' if self.vpp else ''} dp={self.dp} ep={self.ep} etp={self.etp} "
            f"edp={self.edp} sp={self.sequence_parallel} dist_opt={self.distributed_optimizer}"
        )
        rows = [f"  rank {r:>4}: " + " ".join(f"{k}={v}" for k, v in self.coords(r).items())
                for r in range(min(self.world_size, 64))]
        if self.world_size > 64:
            rows.append(f"  … {self.world_size - 64} more ranks")
        return "\n".join([head, *rows])

    def resolved_backend(self) -> str:
        import torch

        if self.backend is Backend.auto:
            return "nccl" if torch.cuda.is_available() else "gloo"
        return self.backend.value

    def init(self, seed: int, timeout_minutes: int = 30) -> None:
        """Start torch.distributed (env:// rendezvous from torchrun / SLURM) and megatron groups,
        and seed the RNGs (megatron derives per-TP-rank and per-expert streams from `seed`)."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        backend = self.resolved_backend()
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            if "MASTER_ADDR" not in os.environ:  # a plain single-process `qwen3kd train`
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
                os.environ.setdefault("RANK", "0")
                os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"layout is for {self.world_size} processes but torch.distributed has "
                f"{dist.get_world_size()}"
            )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
            distributed_timeout_minutes=timeout_minutes,
        )
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        log.info("parallel layout: %s", self.describe().splitlines()[0])

    @staticmethod
    def destroy() -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_heads(tp: int, model: ModelConfig) -> None:
    if model.num_attention_heads % tp:
        raise ValueError(
            f"parallel.tensor={tp} does not divide model.num_attention_heads="
            f"{model.num_attention_heads}"
        )
    if model.num_key_value_heads % tp:
        raise ValueError(
            f"parallel.tensor={tp} does not divide model.num_key_value_heads="
            f"{model.num_key_value_heads}"
        )
    if model.vocab_size % tp:
        raise ValueError(f"parallel.tensor={tp} does not divide model.vocab_size={model.vocab_size}")


def _check_pipeline(par: ParallelConfig, model: ModelConfig) -> None:
    pp, layers = par.pipeline, model.num_hidden_layers
    first, last = par.first_stage_layers, par.last_stage_layers
    if (first is not None or last is not None) and pp == 1:
        raise ValueError("parallel.first_stage_layers / last_stage_layers need parallel.pipeline > 1")
    rest, middle = layers, pp
    for key, n in (("first_stage_layers", first), ("last_stage_layers", last)):
        if n is not None:
            if not 0 < n < layers:
                raise ValueError(f"parallel.{key}={n} must be in 1..{layers - 1}")
            rest, middle = rest - n, middle - 1
    if middle and (rest < middle or rest % middle):
        raise ValueError(
            f"parallel.pipeline={pp} does not divide model.num_hidden_layers={layers}"
            + (" (after first/last stage layers)" if middle != pp else "")
            + "; set parallel.first_stage_layers / last_stage_layers for an uneven split"
        )
    if middle == 0 and rest != 0:
        raise ValueError(
            f"parallel.first_stage_layers + last_stage_layers must equal "
            f"model.num_hidden_layers={layers} when parallel.pipeline=2"
        )
    if par.virtual_pipeline is not None:
        vpp = par.virtual_pipeline
        if pp == 1 or vpp < 2:
            raise ValueError("parallel.virtual_pipeline needs parallel.pipeline > 1 and a value >= 2")
        if first is not None or last is not None or layers % (pp * vpp):
            raise ValueError(
                f"parallel.pipeline × parallel.virtual_pipeline = {pp * vpp} must divide "
                f"model.num_hidden_layers={layers} (uneven stages are not supported with it)"
            )


def _check_experts(par: ParallelConfig, model: ModelConfig, tp: int, dp: int, ep: int, etp: int):
    if not model.num_experts:
        if ep > 1:
            raise ValueError(f"parallel.expert={ep} needs an MoE model (model.num_experts > 0)")
        return
    if model.num_experts % ep:
        raise ValueError(
            f"parallel.expert={ep} does not divide model.num_experts={model.num_experts}"
        )
    if (tp * dp) % (etp * ep):
        raise ValueError(
            f"parallel.expert × expert_tensor = {ep} × {etp} must divide tensor × data parallel "
            f"= {tp} × {dp} (expert groups are carved out of the data-parallel ranks)"
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
