"""Set-up shared by the torchrun workers of the distributed tests (they run as scripts, beside
this file)."""


def trainer_in_process(config: str, overrides: list[str]):
    """Under torchrun: the Trainer of `config` set up in this process, as `qwen3kd train` sets it up
    (logging, megatron patches, validation), for workers that inspect it."""
    import megatron_patches
    from qwen3kd.config.loader import load_config
    from qwen3kd.config.validate import validate
    from qwen3kd.log import setup_logging
    from qwen3kd.trainer.loop import Trainer

    setup_logging()
    megatron_patches.apply_all()
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, validate(cfg))
    trainer.setup()
    return trainer
