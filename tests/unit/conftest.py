import pytest


@pytest.fixture(scope="session")
def megatron_world():
    """A one-process gloo world with megatron's parallel state (TP = PP = EP = 1), patched for CPU."""
    import os

    import megatron_patches
    from qwen3kd.config.schema import ModelConfig, ParallelConfig
    from qwen3kd.distributed.layout import ParallelLayout

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    megatron_patches.apply_all()
    model = ModelConfig(name="x", num_hidden_layers=2, hidden_size=64, intermediate_size=64,
                        num_attention_heads=2, num_key_value_heads=2)
    layout = ParallelLayout.from_config(ParallelConfig(), model, world_size=1)
    layout.init(seed=1234)
    yield layout
    ParallelLayout.destroy()
