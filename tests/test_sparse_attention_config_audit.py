"""Audit of sae_fast.sparse_attention.patterns: MInference JSON configs that would lose or
corrupt a head's pattern are refused with the place, and every pattern that can be built
can be saved and loaded back."""

import pytest

from sae_fast.sparse_attention import HeadPattern, SparseAttentionConfig


@pytest.mark.parametrize("keys", [("0", "00"), ("1", "01", "0")])
def test_a_head_listed_twice_is_refused(keys):
    """ "1" and "01" are the same head: one entry was silently dropped (and the head count
    looked right), so the layer ran a pattern nobody chose."""
    layer = {key: ["vertical_and_slash", 10 + n, 20, 0.5] for n, key in enumerate(keys)}
    with pytest.raises(ValueError, match="lists head . twice"):
        SparseAttentionConfig.from_json_list([layer])


def test_non_ascii_digit_head_keys_are_refused_by_name():
    with pytest.raises(ValueError, match="head keys must be decimal strings"):
        SparseAttentionConfig.from_json_list([{"\u00b2": ["dense", 0, 0, 1.0]}])


@pytest.mark.parametrize("score", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_score_is_refused_where_it_is_made(score, tmp_path):
    """A NaN score was accepted, saved as the non-JSON token NaN, and the saved file was then
    refused by load(): the search's output could not be read back."""
    with pytest.raises(ValueError, match="score must be finite"):
        HeadPattern.dense(score)
    with pytest.raises(ValueError, match="score must be finite"):
        HeadPattern.vertical_slash(30, 800).with_score(score)


def test_every_constructible_pattern_round_trips(tmp_path):
    pats = [HeadPattern.vertical_slash(0, 1, 0.25), HeadPattern.a_shape(0, 1, 1), HeadPattern.block_sparse(1, 0.0),
            HeadPattern.dense(1)]
    config = SparseAttentionConfig([pats, pats[::-1]])
    assert SparseAttentionConfig.load(config.save(tmp_path / "c.json")) == config
