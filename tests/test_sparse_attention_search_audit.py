"""Audit of sae_fast.sparse_attention.search: the kept-mass score against a brute-force fp64
computation (GQA, B > 1, block_m != block_n, chunked rows) and how a search reports a model
whose attention is not finite."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sae_fast.reference.attention import expand_block_sparse_mask  # noqa: E402
from sae_fast.sparse_attention import (HeadPattern, attention_mass_kept, build_layer_index,  # noqa: E402
                                       search_patterns)


@pytest.mark.parametrize("bm, bn, rows", [(64, 64, 1024), (32, 16, 40), (16, 64, 16)])
def test_kept_mass_is_the_row_average_of_the_listed_causal_probabilities(bm, bn, rows):
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, T, D = 2, 2, 3, 133, 8
    q, k = 2 * torch.randn(B, Hkv * G, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    pats = [HeadPattern.vertical_slash(3, 5), HeadPattern.a_shape(4, 20), HeadPattern.block_sparse(1),
            HeadPattern.dense(), HeadPattern.vertical_slash(10, 2), HeadPattern.a_shape(0, 1)]
    idx = [build_layer_index(q, k, pats, block_m=bm, block_n=bn),
           build_layer_index(q, k, [HeadPattern.a_shape(1, 3)] * 6, block_m=bm, block_n=bn)]
    got = attention_mass_kept(q, k, idx, scale=0.5, block_m=bm, block_n=bn, rows_per_chunk=rows)
    want = torch.zeros(2, 6, dtype=torch.float64)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for c, index in enumerate(idx):
        mask = expand_block_sparse_mask(*index, T, T, block_m=bm, block_n=bn)
        for b in range(B):
            for h in range(6):
                s = (q[b, h].double() @ k[b, h // G].double().T * 0.5).masked_fill(~causal, float("-inf"))
                want[c, h] += (torch.softmax(s, -1) * mask[b, h]).sum(-1).mean() / B
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    assert float(got[0, 3]) == pytest.approx(1.0, abs=1e-6)  # the dense head keeps everything


def test_a_model_with_non_finite_attention_is_named_not_called_missing():
    """A layer whose q is NaN gives NaN kept mass: the search said the layers 'were never
    called through the attention interface' (it took NaN for 'not filled in')."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[:16] = float("nan")  # head 0 of layer 1
    ids = torch.randint(0, 97, (1, 80), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="layer 1 head 0: the dense attention probabilities are not finite"):
        search_patterns(model, ids, [HeadPattern.a_shape(4, 8), HeadPattern.dense()])
    assert model.config._attn_implementation == "sdpa"
