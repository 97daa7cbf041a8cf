import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def storage_root(tmp_path, monkeypatch):
    root = tmp_path / "gist_root"
    monkeypatch.setenv("GIST_STORAGE_ROOT", str(root))
    return root
