"""Each megatron patch is needed: the scenario it fixes fails without it (with the error its
docstring quotes) and works with it. Patches needing two ranks are in tests/distributed."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import megatron_patches
from qwen3kd.config.loader import load_config
from qwen3kd.config.validate import validate

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"
NO_CUDA = "Torch not compiled with CUDA enabled"


def _reseed() -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)  # re-applying rng_tracker starts an empty tracker


@contextlib.contextmanager
def without(name: str):
    megatron_patches.undo_all()
    megatron_patches.apply_all(skip=[name])
    try:
        if name != "rng_tracker":
            _reseed()
        yield
    finally:
        megatron_patches.undo_all()
        megatron_patches.apply_all()
        _reseed()


def _forward(preset: str, overrides=()):
    from qwen3kd.models.qwen3 import build_model

    cfg = load_config(MODELS / f"{preset}.yaml", list(overrides))
    (model,) = build_model(cfg, validate(cfg))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 8))
    return model(tokens, torch.arange(8).expand(2, 8), None, labels=tokens).sum()


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")


def test_all_patches_are_registered():
    names = {p.stem for p in Path(megatron_patches.__file__).parent.glob("*.py")}
    assert names - {"__init__", "_util"} == set(megatron_patches.PATCHES)


@pytest.mark.parametrize("name", ["current_device", "cuda_literal"])
def test_forward_needs_cpu_device_patches(megatron_world, name):
    with without(name), pytest.raises(AssertionError, match=NO_CUDA):
        _forward("tiny-dense")
    assert torch.isfinite(_forward("tiny-dense"))


def test_rng_tracker(megatron_world):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    with without("rng_tracker"), pytest.raises((AssertionError, RuntimeError), match=NO_CUDA):
        model_parallel_cuda_manual_seed(1)
    model_parallel_cuda_manual_seed(1)


def test_rng_tracker_fork_restores_the_outer_stream(megatron_world):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7)
    torch.manual_seed(0)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    outer = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(outer, torch.rand(3))  # the fork did not consume the default stream
    model_parallel_cuda_manual_seed(7)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(a, torch.rand(3))  # the forked stream is reproducible from its seed


def test_moe_router_needs_te_gemm_fallback(megatron_world):
    with without("moe_te_gemm"), pytest.raises(NameError, match="te_general_gemm"):
        _forward("tiny-moe")
    assert torch.isfinite(_forward("tiny-moe"))


def test_alltoall_dispatcher_needs_streams(megatron_world):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None  # a class attribute, created once
    with without("cuda_streams"), pytest.raises((AssertionError, RuntimeError)):
        _forward("tiny-moe")
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None
    assert torch.isfinite(_forward("tiny-moe"))


@pytest.mark.parametrize("dist_opt", [True, False])
def test_optimizer_needs_cuda_type_names(megatron_world, dist_opt):
    """Distributed optimizer: type check at build; plain one: the clip_grad assert at step."""
    from qwen3kd.models.qwen3 import build_model
    from qwen3kd.trainer.optim import build_optimizer, wrap_ddp

    cfg = load_config(MODELS / "tiny-dense.yaml",
                      [f"parallel.distributed_optimizer={str(dist_opt).lower()}"])
    layout = validate(cfg)

    def build_and_step():
        model = wrap_ddp(build_model(cfg, layout), cfg, layout)
        opt, _ = build_optimizer(model, cfg, layout)
        for p in model[0].parameters():
            p.main_grad.fill_(1.0)  # norm > clip_grad = 1, so clipping runs
        return opt.step()

    error = (TypeError, "Wrapped parameters must be one of torch.cuda.FloatTensor") if dist_opt \
        else (AssertionError, "")
    with without("type_str"), pytest.raises(error[0], match=error[1]):
        build_and_step()
    ok, grad_norm, _ = build_and_step()
    assert ok and grad_norm > 1.0


def test_sequence_parallel_norm(megatron_world):
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                            tensor_model_parallel_size=2, sequence_parallel=True,
                            normalization="RMSNorm", use_cpu_initialization=True)
    with without("sp_norm"), pytest.raises(AssertionError, match="sequence parallel not supported"):
        gpt_layer_specs.LNImpl(cfg, hidden_size=64, eps=1e-6)
    norm = gpt_layer_specs.LNImpl(cfg, hidden_size=64, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert norm.weight.sequence_parallel  # so finalize_model_grads sums its grad over TP ranks


def test_version_guard_names_the_patch(monkeypatch):
    from megatron_patches import _util

    monkeypatch.setattr(_util, "megatron_version", lambda: _util.Version("0.17.0"))
    with pytest.raises(RuntimeError, match="megatron_patches.x was written for megatron-core"):
        _util.check_version("x", ">=0.16.1,<0.17")
