"""Rollouts: the engine protocol, its vLLM implementation, prompts, and the student → engine weight sync."""
