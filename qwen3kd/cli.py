"""`qwen3kd` command line: the only place that parses arguments.

    qwen3kd train CONFIG [key=value …] [--dry-run] [--debug]
    qwen3kd prepare CONFIG [key=value …] [--workers N] [--debug]
    qwen3kd generate CONFIG [key=value …] [--debug]
    qwen3kd eval CONFIG --model NAME=PATH [--model …] [key=value …] [--debug]
    qwen3kd convert SRC DST [SRC DST …] --to megatron|hf [--model PRESET] [--dtype …] [--debug]
    qwen3kd demo CONFIG [key=value …] [--debug]
    qwen3kd study run|report CONFIG [key=value …] [--debug]
    qwen3kd compare [RUN_ID …] [--experiment NAME] --uri URI [--out DIR] [--debug]
    qwen3kd submit CONFIG --nodes N [--nproc-per-node G] [--command C] [--sbatch ARG …] [key=value …]

Bad input (config, layout, files) ends with one line on stderr and exit status 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("qwen3kd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3kd", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the student: distillation when the config has a teacher, else causal LM")
    t.add_argument("config", help="experiment YAML (a delta on the defaults in qwen3kd/config)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tensor=2")
    t.add_argument("--dry-run", action="store_true",
                   help="validate config and layout, print sizes; build no tensors")
    t.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    r = sub.add_parser("prepare", help="tokenize data.path and data.eval_path once into indexed "
                       "datasets, where `train` with the same config reads them")
    r.add_argument("config", help="the experiment YAML that `train` will run")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.cache=/shared/prepared")
    r.add_argument("--workers", type=int, help="rendering processes (default data.prepare_workers)")
    r.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    g = sub.add_parser("generate", help="the teacher answers generate.prompts (off-policy data; "
                       "resumable, in shards)")
    g.add_argument("config", help="YAML with teacher.load, generate.prompts and rollout settings")
    g.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. generate.both_modes=true")
    g.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    e = sub.add_parser("eval", help="models answer accuracy.prompts greedily in each mode: "
                       "accuracy, mode compliance, thinking length")
    e.add_argument("config", help="YAML with accuracy.prompts (prompts with an 'answer')")
    e.add_argument("overrides", nargs="*", help="key=value overrides")
    e.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a Hugging Face folder or Megatron checkpoint to evaluate (repeatable)")
    e.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    c = sub.add_parser("convert", help="Hugging Face folder <-> Megatron checkpoint (streamed)")
    c.add_argument("paths", nargs="+", metavar="SRC DST",
                   help="pairs: a Hugging Face folder or a Megatron checkpoint (incl. training), then "
                   "the new directory (must not exist); several pairs convert in one process")
    c.add_argument("--to", required=True, choices=["megatron", "hf"])
    c.add_argument("--model", help="model preset YAML: checked against SRC; needed for Megatron "
                   "checkpoints not written by qwen3kd")
    c.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="--to hf: output dtype (auto: the original config.json's, else as stored)")
    c.add_argument("--max-shard-size", type=float, default=5.0,
                   help="--to hf: GB per safetensors file")
    c.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    d = sub.add_parser("demo", help="the toy strong-to-weak pipeline on a CPU: teacher, teacher "
                       "answers, off-policy, on-policy, control arm, evaluation")
    d.add_argument("config", help="experiment YAML (e.g. configs/experiments/demo-arithmetic-cpu.yaml)")
    d.add_argument("overrides", nargs="*", help="key=value overrides")
    d.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    st = sub.add_parser("study", help="the pre-registered study (study/protocol.md): the demo for "
                        "every variant × seed (run, resumable), then the protocol's analysis (report)")
    st.add_argument("action", choices=["run", "report"])
    st.add_argument("config", help="study YAML (e.g. configs/experiments/study-cpu.yaml)")
    st.add_argument("overrides", nargs="*", help="key=value overrides")
    st.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    s = sub.add_parser("submit", help="check a job, then queue it on SLURM (launch/slurm/"
                       "qwen3kd.sbatch): prints the sbatch command")
    s.add_argument("config", help="experiment YAML")
    s.add_argument("overrides", nargs="*", help="key=value overrides, passed through unchanged")
    s.add_argument("--nodes", type=int, required=True, help="nodes (sbatch -N)")
    s.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (GPUs)")
    s.add_argument("--command", dest="job_command", default="train",
                   help="the qwen3kd command the job runs: train (default), generate or eval")
    s.add_argument("--sbatch", action="append", default=[], metavar="ARG",
                   help="an sbatch option, e.g. --sbatch=--time=04:00:00 (repeatable)")
    s.add_argument("--dry-run", action="store_true", help="check and print, do not submit")
    s.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    m = sub.add_parser("compare", help="MLflow runs side by side: key metrics, config "
                       "differences, plots (KL per mode, accuracy per phase)")
    m.add_argument("run_ids", nargs="*", help="MLflow run ids (or use --experiment)")
    m.add_argument("--experiment", help="every run of this MLflow experiment")
    m.add_argument("--uri", required=True,
                   help="tracking URI, e.g. sqlite:///runs/demo/mlflow.db or http://host:5000")
    m.add_argument("--out", default="runs/compare", help="folder for runs.md and the PNG plots")
    m.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    return p


def _dry_run(cfg, layout) -> None:
    from qwen3kd.models.params import count_params, per_stage_params

    c = count_params(cfg.model)
    stages = per_stage_params(
        cfg.model, layout.pp, cfg.parallel.first_stage_layers, cfg.parallel.last_stage_layers
    )
    lines = [
        f"model {cfg.model.name}: {c.total:,} parameters ({c.total / 1e9:.3f} B), "
        f"non-embedding {c.non_embedding:,}, active per token {c.active:,}",
        "parameters per pipeline stage (before TP / EP sharding): "
        + ", ".join(f"{n / 1e9:.3f} B" for n in stages),
        "layout: " + layout.describe(),
    ]
    if cfg.teacher is not None:
        from qwen3kd.distributed.layout import teacher_layout
        from qwen3kd.teacher.sizing import memory_table

        t = teacher_layout(cfg, layout)
        tc = count_params(cfg.teacher.model)
        lines += [f"teacher {cfg.teacher.model.name}: {tc.total:,} parameters "
                  f"({tc.total / 1e9:.3f} B), active per token {tc.active:,}",
                  "teacher layout: " + t.describe().splitlines()[0], memory_table(cfg, layout, t)]
    sys.stdout.write("\n".join(lines) + "\n")


def prepare(args) -> int:
    """Prepare what `train CONFIG` reads (data/prepared.py): the same folders, checked and with
    their packing index, so the run starts without tokenizing."""
    from pathlib import Path

    from qwen3kd.config.loader import load_config
    from qwen3kd.config.schema import DataKind
    from qwen3kd.trainer.data import open_file_data, open_tokenizer

    workers = [] if args.workers is None else [f"data.prepare_workers={args.workers}"]
    cfg = load_config(args.config, [*args.overrides, *workers], layout=False)  # one process, any layout
    if cfg.data.kind is DataKind.synthetic:
        log.info("data.kind=synthetic: nothing to prepare")
        return 0
    tok, tok_dir = open_tokenizer(cfg)
    for key, path in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if path:
            data = open_file_data(cfg, Path(path), tok, tok_dir)
            sys.stdout.write(f"{key}: {path} → {data.folder} ({len(data)} rows)\n")
    return 0


def train(args) -> int:
    from qwen3kd.config.loader import load_config, save_resolved
    from qwen3kd.config.validate import validate

    # A dry run checks the config and the layouts, not the paths (a recipe for a cluster names
    # files that exist there).
    cfg = load_config(args.config, args.overrides, check_files=not args.dry_run)
    layout = validate(cfg, check_files=not args.dry_run)
    if args.dry_run:
        _dry_run(cfg, layout)
        return 0

    from pathlib import Path

    import megatron_patches
    from qwen3kd.log import rank
    from qwen3kd.trainer.loop import Trainer

    # QWEN3KD_SKIP_PATCHES=a,b leaves patches out, to see what fails without them (tests, triage).
    skip = [n for n in os.environ.get("QWEN3KD_SKIP_PATCHES", "").split(",") if n]
    megatron_patches.apply_all(skip=skip)
    if rank() == 0:
        save_resolved(cfg, Path(cfg.run.dir))
    from qwen3kd.stop import EXIT_STOPPED, StopRequested, mark_stopped

    trainer = Trainer(cfg, layout)
    try:
        trainer.setup()
        trainer.train()
    except StopRequested as e:
        log.warning("%s", e)
        mark_stopped(str(e))
        return EXIT_STOPPED
    except BaseException:
        trainer.fail()
        raise
    finally:
        layout.destroy()
    return 0


def generate(args) -> int:
    from qwen3kd.config.loader import load_config
    from qwen3kd.rollout.generate import run_generate
    from qwen3kd.stop import EXIT_STOPPED, StopRequested, mark_stopped

    try:
        run_generate(load_config(args.config, args.overrides))
    except StopRequested as e:
        log.warning("%s", e)
        mark_stopped(str(e))
        return EXIT_STOPPED
    return 0


def evaluate(args) -> int:
    from pathlib import Path

    from qwen3kd.config.loader import load_config
    from qwen3kd.errors import ConfigError
    from qwen3kd.rollout.accuracy import run_eval

    models = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {item!r}: expected NAME=PATH")
        if name in models:
            raise ConfigError(f"--model {name}: given twice")
        models[name] = Path(path)
    run_eval(load_config(args.config, args.overrides), models)
    return 0


def demo(args) -> int:
    from pathlib import Path

    from qwen3kd.config.loader import load_config
    from qwen3kd.demo.pipeline import Demo, StageError
    from qwen3kd.demo.report import table, verdict

    cfg = load_config(args.config, args.overrides)
    try:
        summary = Demo(cfg, Path(args.config)).run()
    except StageError as e:
        sys.stderr.write(f"qwen3kd: error: {e}\n")
        return 1
    browse = summary["mlflow"]["uri"]
    sys.stdout.write("\n" + table(summary) + "\n" + verdict(summary) + f"\nsummary: {Path(cfg.run.dir) / 'summary.json'}"
                     + (f"; runs: mlflow ui --backend-store-uri {browse}" if browse else "") + "\n")
    return 0


def study(args) -> int:
    from pathlib import Path

    from qwen3kd.config.loader import load_config
    from qwen3kd.demo.pipeline import StageError
    from qwen3kd.study.run import Study

    cfg = load_config(args.config, args.overrides)
    s = Study(cfg, Path(args.config))
    try:
        if args.action == "run":
            s.run()
        else:
            s.report()
    except StageError as e:
        sys.stderr.write(f"qwen3kd: error: {e}\n")
        return 1
    sys.stdout.write((s.root / "report.md").read_text() + f"\nreport: {s.root / 'report.json'}\n")
    return 0


def submit(args) -> int:
    from qwen3kd.submit import submit as run_submit

    return run_submit(args.job_command, args.config, args.overrides, args.nodes, args.nproc_per_node,
                      args.sbatch, args.dry_run)


def compare(args) -> int:
    from pathlib import Path

    from qwen3kd.tracking.compare import compare as run_compare

    text, _ = run_compare(args.uri, args.run_ids, args.experiment, Path(args.out))
    sys.stdout.write(text)
    return 0


def convert(args) -> int:
    from pathlib import Path

    from qwen3kd.checkpoint import convert as conv
    from qwen3kd.config.loader import load_config
    from qwen3kd.errors import ConfigError

    if len(args.paths) % 2:
        raise ConfigError(f"qwen3kd convert: SRC DST pairs expected, got {len(args.paths)} paths")
    preset = load_config(args.model).model if args.model else None
    try:
        # One process for many pairs: its imports and torch.distributed world are the cost of a
        # small conversion (`qwen3kd eval` exports a dozen dev-curve checkpoints at once).
        for src, dst in zip(args.paths[::2], args.paths[1::2], strict=True):
            if args.to == "megatron":
                conv.hf_to_megatron(Path(src), Path(dst), preset)
            else:
                conv.megatron_to_hf(Path(src), Path(dst), preset, conv.DTYPES.get(args.dtype),
                                    int(args.max_shard_size * 1e9))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after flags (`train cfg.yaml --dry-run a=1`): collect the leftovers.
    args, rest = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    unknown = [r for r in rest if r.startswith("-") or "=" not in r or not takes_overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if takes_overrides:
        args.overrides = [*args.overrides, *rest]
    from qwen3kd.errors import UserError
    from qwen3kd.log import setup_logging

    setup_logging(args.debug)
    try:
        commands = {"train": train, "prepare": prepare, "generate": generate, "eval": evaluate, "convert": convert,
                    "demo": demo, "study": study, "compare": compare, "submit": submit}
        return commands[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        sys.stderr.write(f"qwen3kd: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
