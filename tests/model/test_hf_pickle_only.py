"""A HF directory holding only pytorch_model.bin (older checkpoints) is refused with the way to convert it."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


def test_pickle_only_directory_names_the_conversion(tmp_path):
    torch.manual_seed(0)
    Transformer(ModelConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=4, d_ff=48,
                            max_seq_len=32)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # (never unpickled: the name suffices)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is a pickle: .*save_pretrained\(dir\) writes "
                                              "safetensors"):
        Transformer.from_pretrained(tmp_path)
