import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def toy_assets(tmp_path_factory):
    """Toy tokenizer, tiny teacher (HF folder) and chat data in both modes (qwen3kd/toy.py)."""
    from qwen3kd.toy import make_toy_assets

    return make_toy_assets(tmp_path_factory.mktemp("toy-assets"))
