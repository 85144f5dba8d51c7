import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


ROOT = Path(__file__).resolve().parents[1]

# `make test` runs two pytest-xdist workers. A test file goes to one worker as a whole (its
# module-scoped fixtures are built once); the on-policy tests and the SLURM tests form one unit, as
# they share the session's `onpolicy_run`. The longest units are handed out first so that both
# workers finish at about the same time. (A scheduler of our own: xdist's xdist_group marks do not
# reach its scheduler under pytest 9.2.)
_UNITS = {"test_onpolicy": "onpolicy", "test_slurm": "onpolicy"}
_LONGEST_FIRST = ("onpolicy", "tests/e2e/test_demo.py")


def _unit(nodeid: str) -> str:
    file = nodeid.split("::")[0]
    return _UNITS.get(Path(file).stem, file)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return ByUnit(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {u: i for i, u in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # stable: files keep their order


def _hf_with_tokenizer(preset: str, out: Path, toy_assets: Path, seed: int) -> Path:
    """A random Hugging Face folder of a model preset, with the toy tokenizer's files."""
    from hf_models import save_tiny_hf
    from transformers import AutoTokenizer

    from qwen3kd.config.loader import load_config

    save_tiny_hf(load_config(ROOT / "configs" / "models" / preset).model, out, seed=seed)
    AutoTokenizer.from_pretrained(toy_assets / "tokenizer").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def student_hf(toy_assets, tmp_path_factory):
    """The student's initial weights: a random tiny-student HF folder with the toy tokenizer."""
    return _hf_with_tokenizer("tiny-student.yaml", tmp_path_factory.mktemp("student") / "hf",
                              toy_assets, seed=1)


@pytest.fixture(scope="session")
def moe_teacher_hf(toy_assets, tmp_path_factory):
    """A random tiny Qwen3-MoE teacher (tiny-moe-teacher preset) with the toy tokenizer."""
    return _hf_with_tokenizer("tiny-moe-teacher.yaml", tmp_path_factory.mktemp("moe") / "hf",
                              toy_assets, seed=2)


@pytest.fixture(scope="session")
def toy_assets(tmp_path_factory):
    """Toy tokenizer, tiny teacher (HF folder) and chat data in both modes (qwen3kd/toy.py)."""
    from qwen3kd.toy import make_toy_assets

    return make_toy_assets(tmp_path_factory.mktemp("toy-assets"))


# The scripted model's answers: think mode opens its thinking and never closes it (S T S T …);
# after the empty think block ("ĊĊ", as no_think prompts and the budget text end) it answers "U"
# and ends the turn.
SCRIPT = {"Ċ": "<think>", "<think>": "S", "S": "T", "T": "S", "ĊĊ": "U", "U": "<|im_end|>"}


@pytest.fixture(scope="session")
def scripted_model(toy_assets, tmp_path_factory):
    """(HF folder, token ids) of a tiny Qwen3 that follows SCRIPT (hf_models.save_scripted_qwen3)."""
    from hf_models import save_scripted_qwen3

    out = tmp_path_factory.mktemp("scripted")
    return out, save_scripted_qwen3(out, toy_assets / "tokenizer", SCRIPT)


@pytest.fixture(scope="session")
def onpolicy_run(toy_assets, tmp_path_factory) -> Path:
    """The run directory of one uninterrupted on-policy run (onpolicy_args, MLflow on): what
    tests/distributed/test_onpolicy.py checks, and the reference of the preempted SLURM job."""
    from helpers import onpolicy_args, qwen3kd

    run = tmp_path_factory.mktemp("onpolicy") / "clean"
    qwen3kd("train", *onpolicy_args(toy_assets), f"run.dir={run}", nproc=2, timeout=400)
    return run
