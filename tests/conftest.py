import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


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
