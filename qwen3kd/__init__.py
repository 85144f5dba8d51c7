"""qwen3kd: Qwen3-style strong-to-weak distillation on Megatron-Core."""

__version__ = "0.1.0"
