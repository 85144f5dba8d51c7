"""Compare a model preset with a Hugging Face `config.json` (e.g. a downloaded Qwen3 checkpoint).

    python tools/check_preset.py configs/models/qwen3-8b.yaml /models/Qwen3-8B/config.json

Prints one line per field that differs and exits 1 if any does; fields the preset does not model
(e.g. `torch_dtype`, `bos_token_id`) are ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qwen3kd.checkpoint.hf import arch_fields, unsupported
from qwen3kd.checkpoint.manifest import differences as arch_differences
from qwen3kd.config.loader import load_config

log = logging.getLogger("check_preset")

def differences(model, hf: dict) -> list[str]:
    return arch_differences(model, arch_fields(hf), "config.json", ours="preset") + unsupported(hf)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", type=Path)
    p.add_argument("config_json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_config(args.preset).model
    diffs = differences(model, json.loads(args.config_json.read_text()))
    for d in diffs:
        log.error(d)
    if not diffs:
        log.info("%s matches %s", args.preset, args.config_json)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
