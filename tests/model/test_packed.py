"""Packed documents (AttnMetadata.doc_ids): one packed row gives the same logits as its documents alone."""

import pytest
import torch

from lmforge.model.config import MLAConfig, ModelConfig
from lmforge.model.meta import AttnMetadata, packed_positions
from lmforge.model.transformer import Transformer

VARIANTS = {
    "llama": dict(),
    "sliding": dict(sliding_window=3),
    "learned": dict(pos_emb="learned", norm="layernorm", activation="gelu", bias=True),
    "mla": dict(attention="mla"),
}


def _model(**kw) -> Transformer:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    if kw.get("attention") == "mla":
        base["mla"] = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


def test_packed_positions_restart_per_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert packed_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_row_equals_documents_alone(variant):
    model = _model(**VARIANTS[variant])
    docs = [torch.randint(0, 64, (n,)) for n in (5, 7, 4)]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(ids, packed_positions(doc_ids), meta=AttnMetadata.packed(doc_ids))[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
