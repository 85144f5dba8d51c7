"""Peak memory of `qwen3kd convert`, both directions, on a Qwen3 model saved in many shards.

    .venv/bin/python tools/measure_convert_memory.py [--layers 16] [--hidden 1024] [--shard-mb 100]

Builds a random Qwen3 (transformers) of the given size in ≥ 8 safetensors shards, converts it to
a Megatron checkpoint and back, each conversion in its own process, and prints each process's
peak resident memory next to the model's total size, its largest shard and its largest layer.
A tiny model converted the same way gives the fixed cost (Python, torch, megatron imports).
Linux keeps a process's peak RSS across fork + exec, so this process imports nothing heavy and
builds the models in a child of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("measure_convert_memory")
MB = 1 << 20


def _save_model(out: Path, layers: int, hidden: int, shard_mb: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=32000, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 128, head_dim=64, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out, max_shard_size=f"{shard_mb}MB")


def _peak_rss_mb(cmd: list[str]) -> float:
    """Run `cmd`; its peak resident set size (Linux reports ru_maxrss in KiB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    return usage.ru_maxrss * 1024 / MB


def _convert(src: Path, dst: Path, to: str, *extra: str) -> float:
    return _peak_rss_mb([sys.executable, "-m", "qwen3kd.cli", "convert", str(src), str(dst),
                         "--to", to, *extra])


def _header(path: Path) -> dict:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def _sizes(folder: Path, layers: int) -> dict[str, float]:
    per_layer = [0] * layers
    for shard in folder.glob("*.safetensors"):
        for name, info in _header(shard).items():
            if name.startswith("model.layers."):
                start, end = info["data_offsets"]
                per_layer[int(name.split(".")[2])] += end - start
    shards = [f.stat().st_size for f in folder.glob("*.safetensors")]
    return {"shards": len(shards), "total_mb": sum(shards) / MB, "largest_shard_mb": max(shards) / MB,
            "largest_layer_mb": max(per_layer) / MB}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--shard-mb", type=int, default=100)
    p.add_argument("--make", type=Path, help=argparse.SUPPRESS)  # child: save the model there
    args = p.parse_args(argv)
    if args.make:
        _save_model(args.make, args.layers, args.hidden, args.shard_mb)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for out, size in ((d / "tiny", ["--layers", "2", "--hidden", "128", "--shard-mb", "1"]),
                          (d / "hf", sys.argv[1:] if argv is None else argv)):
            subprocess.run([sys.executable, __file__, "--make", str(out), *size], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sizes = _sizes(d / "hf", args.layers)
        shard_gb = str(args.shard_mb * MB / 1e9)
        base_in = _convert(d / "tiny", d / "tiny-mg", "megatron")
        base_out = _convert(d / "tiny-mg", d / "tiny-back", "hf", "--max-shard-size", shard_gb)
        to_mg = _convert(d / "hf", d / "mg", "megatron")
        to_hf = _convert(d / "mg", d / "back", "hf", "--max-shard-size", shard_gb)
    result = {**sizes, "fixed_cost_mb": {"to_megatron": base_in, "to_hf": base_out},
              "peak_rss_mb": {"to_megatron": to_mg, "to_hf": to_hf}}
    log.info("model: %.0f MB in %d shards (largest shard %.0f MB, largest layer %.0f MB)",
             sizes["total_mb"], sizes["shards"], sizes["largest_shard_mb"], sizes["largest_layer_mb"])
    for way, peak, base in (("HF → Megatron", to_mg, base_in), ("Megatron → HF", to_hf, base_out)):
        log.info("%s: peak RSS %.0f MB = fixed %.0f MB + %.0f MB (%.2f × the model)", way, peak, base,
                 peak - base, (peak - base) / sizes["total_mb"])
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
