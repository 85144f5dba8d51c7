"""torchrun worker: load checkpoints into megatron at a layout, write the full logits of each.

    torchrun --nproc_per_node 2 hf_logits_worker.py SRC[,SRC…] OUT_PREFIX PRESET.yaml [key=value …]

Each SRC is what `checkpoint.load` accepts (a Hugging Face folder or a Megatron checkpoint); the
logits of the i-th go to OUT_PREFIX.i.pt. After loading the first (a Hugging Face folder), the
rollout weight sync gathers the weights back (rollout/weight_sync.py); OUT_PREFIX.sync.json says
how they compare with the folder's tensors on the first rank of every data-parallel replica.
"""

from __future__ import annotations

import sys

import torch


def main(sources: str, out: str, preset: str, *overrides: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    import megatron_patches
    from qwen3kd.checkpoint.weights import load_initial_weights
    from qwen3kd.config.loader import load_config
    from qwen3kd.config.validate import validate
    from qwen3kd.models.qwen3 import build_model

    megatron_patches.apply_all()
    cfg = load_config(preset, list(overrides))
    layout = validate(cfg)
    layout.init(seed=0)
    chunks = build_model(cfg, layout)
    for c in chunks:
        c.eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand_as(tokens)

    def loss_func(logits):
        full = gather_from_tensor_model_parallel_region(logits)  # [B, S, V/TP] → [B, S, V]
        return torch.zeros(()), torch.tensor(1), {"logits": full}

    def forward_step(it, model):
        next(it)
        return model(tokens, pos, None), loss_func

    for i, src in enumerate(sources.split(",")):
        with torch.no_grad():
            for c in chunks:  # a failed load must not leave the previous weights in place
                for p in c.parameters():
                    p.fill_(float("nan"))
            load_initial_weights(chunks, src, cfg.model)
        if i == 0:
            check_weight_sync(chunks, src, cfg.model, out)
            data = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([0]), model=chunks[0],
                num_microbatches=1, seq_length=24, micro_batch_size=2, forward_only=True,
            )
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save(data[0]["logits"], f"{out}.{i}.pt")
        dist.barrier()
    layout.destroy()


def check_weight_sync(chunks, hf_dir: str, model, out: str) -> None:
    """Gathered HF tensors vs the folder's: names, shapes, values (bitwise)."""
    import json

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from qwen3kd.checkpoint.hf import HFCheckpoint
    from qwen3kd.rollout.weight_sync import hf_weights

    got = {n: t.clone() for n, t in hf_weights(chunks, model)}
    first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    report = None
    if first:
        ref = HFCheckpoint(hf_dir)
        want = {n: ref.get(n) for n in ref.names()}
        if model.tie_word_embeddings:  # sent explicitly for vLLM (see weight_sync.py)
            want.setdefault("lm_head.weight", want["model.embed_tokens.weight"])
        report = {"missing": sorted(set(want) - set(got)), "extra": sorted(set(got) - set(want)),
                  "different": sorted(n for n in set(want) & set(got) if not torch.equal(want[n], got[n])),
                  "tensors": len(got)}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        with open(f"{out}.sync.json", "w") as f:
            json.dump([r for r in reports if r is not None], f)


if __name__ == "__main__":
    main(*sys.argv[1:])
