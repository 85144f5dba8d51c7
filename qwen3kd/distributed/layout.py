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

from qwen3kd.config.schema import Backend, JobConfig, ModelConfig, ParallelConfig

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
        cls, par: ParallelConfig, model: ModelConfig, world_size: int | None = None, *,
        key: str = "parallel", model_key: str = "model",
    ) -> ParallelLayout:
        """Check `par` against `model` and the world size; raise ValueError naming the key
        (`key` and `model_key`: where `par` and `model` are in the config)."""
        env = os.environ.get("WORLD_SIZE")
        launched = world_size or (int(env) if env else None)
        if par.world_size is not None and launched is not None and par.world_size != launched:
            raise ValueError(
                f"parallel.world_size={par.world_size} but the launcher started {launched} processes"
            )
        world = par.world_size or launched or 1
        k, mk = key, model_key
        for name in ("tensor", "pipeline", "expert", "context"):
            if getattr(par, name) < 1:
                raise ValueError(f"{k}.{name} must be >= 1, got {getattr(par, name)}")
        if par.context != 1:
            raise ValueError(f"{k}.context > 1 (context parallelism) is not supported yet")
        tp, pp, ep = par.tensor, par.pipeline, par.expert
        etp = par.expert_tensor if par.expert_tensor is not None else tp
        _check_heads(tp, model, k, mk)
        _check_pipeline(par, model, k, mk)
        if world % (tp * pp):
            raise ValueError(
                f"world size {world} is not divisible by {k}.tensor × {k}.pipeline = {tp} × {pp}"
            )
        dp = world // (tp * pp)
        _check_experts(par, model, tp, dp, ep, etp, k, mk)
        if par.sequence_parallel and tp == 1:
            raise ValueError(f"{k}.sequence_parallel needs {k}.tensor > 1")
        if model.num_experts and tp > 1 and not par.sequence_parallel:
            # MoE layers with TP expect sequence-parallel input (megatron MoELayer).
            raise ValueError(f"an MoE model with {k}.tensor > 1 needs {k}.sequence_parallel=true")
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

    def init(self, seed: int, timeout_minutes: int = 30, teacher: ParallelLayout | None = None):
        """Start torch.distributed (env:// rendezvous from torchrun / SLURM) and megatron groups
        (this layout's: the student's), and seed the RNGs (megatron derives per-TP-rank and
        per-expert streams from `seed`). With `teacher`, also build the teacher layout's groups
        once and return them (distributed/groups.py); megatron's globals stay the student's."""
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
        if teacher is None:
            return None
        from qwen3kd.distributed.groups import build_groups

        groups = build_groups(teacher, self.groups())
        log.info("teacher layout: %s (%d new process groups)", teacher.describe().splitlines()[0],
                 groups.created)
        return groups

    @staticmethod
    def groups():
        """The student's process groups (megatron's globals) as a ProcessGroupCollection."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        return ProcessGroupCollection.use_mpu_process_groups(required_pgs=[
            "tp", "pp", "mp", "cp", "tp_cp", "ep", "expt_tp", "tp_ep", "tp_ep_pp", "embd",
            "pos_embd", "dp", "dp_cp", "intra_dp_cp", "intra_expt_dp", "expt_dp", "tp_dp_cp"])

    @staticmethod
    def destroy() -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def teacher_layout(cfg: JobConfig, student: ParallelLayout) -> ParallelLayout:
    """The teacher's layout over the student's processes: teacher.parallel, a null field taking
    the student's value where the teacher can use it (expert parallelism only for an MoE teacher;
    sequence parallelism only with TP > 1, and always for an MoE teacher with TP > 1, which needs
    it). Its layers are split evenly over its stages; it has no virtual stages and no optimizer."""
    t, s, model = cfg.teacher.parallel, cfg.parallel, cfg.teacher.model
    tp = t.tensor if t.tensor is not None else s.tensor
    sp = t.sequence_parallel
    if sp is None:
        sp = tp > 1 and (s.sequence_parallel or bool(model.num_experts))
    ep = t.expert if t.expert is not None else (s.expert if model.num_experts else 1)
    par = ParallelConfig(
        tensor=tp, pipeline=t.pipeline if t.pipeline is not None else s.pipeline, expert=ep,
        expert_tensor=t.expert_tensor, sequence_parallel=sp, backend=s.backend,
        world_size=student.world_size,
    )
    return ParallelLayout.from_config(par, model, student.world_size, key="teacher.parallel",
                                      model_key="teacher.model")


def _check_heads(tp: int, model: ModelConfig, k: str, mk: str) -> None:
    # TP ≤ KV heads follows from TP dividing them. It matters beyond the shapes: with fewer KV
    # heads than TP ranks megatron's attention falls back to the global TP group (the student's,
    # for a teacher). Qwen3-235B-A22B has 4 KV heads, so its TP is at most 4.
    for name in ("num_attention_heads", "num_key_value_heads", "vocab_size"):
        if name == "num_key_value_heads" and tp > model.num_key_value_heads:
            raise ValueError(f"{k}.tensor={tp} exceeds {mk}.num_key_value_heads="
                             f"{model.num_key_value_heads} (tensor parallelism splits the KV heads)")
        if getattr(model, name) % tp:
            raise ValueError(
                f"{k}.tensor={tp} does not divide {mk}.{name}={getattr(model, name)}"
            )


def _check_pipeline(par: ParallelConfig, model: ModelConfig, k: str, mk: str) -> None:
    pp, layers = par.pipeline, model.num_hidden_layers
    first, last = par.first_stage_layers, par.last_stage_layers
    if (first is not None or last is not None) and pp == 1:
        raise ValueError(f"{k}.first_stage_layers / last_stage_layers need {k}.pipeline > 1")
    rest, middle = layers, pp
    for key, n in (("first_stage_layers", first), ("last_stage_layers", last)):
        if n is not None:
            if not 0 < n < layers:
                raise ValueError(f"{k}.{key}={n} must be in 1..{layers - 1}")
            rest, middle = rest - n, middle - 1
    if middle and (rest < middle or rest % middle):
        raise ValueError(
            f"{k}.pipeline={pp} does not divide {mk}.num_hidden_layers={layers}"
            + (" (after first/last stage layers)" if middle != pp else "")
            + (f"; set {k}.first_stage_layers / last_stage_layers for an uneven split"
               if hasattr(par, "first_stage_layers") and k == "parallel" else "")
        )
    if middle == 0 and rest != 0:
        raise ValueError(
            f"{k}.first_stage_layers + last_stage_layers must equal "
            f"{mk}.num_hidden_layers={layers} when {k}.pipeline=2"
        )
    if par.virtual_pipeline is not None:
        vpp = par.virtual_pipeline
        if pp == 1 or vpp < 2:
            raise ValueError(f"{k}.virtual_pipeline needs {k}.pipeline > 1 and a value >= 2")
        if first is not None or last is not None or layers % (pp * vpp):
            raise ValueError(
                f"{k}.pipeline × {k}.virtual_pipeline = {pp * vpp} must divide "
                f"{mk}.num_hidden_layers={layers} (uneven stages are not supported with it)"
            )


def _check_experts(par: ParallelConfig, model: ModelConfig, tp: int, dp: int, ep: int, etp: int,
                   k: str, mk: str):
    if not model.num_experts:
        if ep > 1:
            raise ValueError(f"{k}.expert={ep} needs an MoE model ({mk}.num_experts > 0)")
        return
    if model.num_experts % ep:
        raise ValueError(f"{k}.expert={ep} does not divide {mk}.num_experts={model.num_experts}")
    if (tp * dp) % (etp * ep):
        raise ValueError(
            f"{k}.expert × {k}.expert_tensor = {ep} × {etp} must divide tensor × data parallel "
            f"= {tp} × {dp} (expert groups are carved out of the data-parallel ranks)"
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
