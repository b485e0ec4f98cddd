"""Activations from a causal LM: the hooked block's output equals transformers' own
hidden_states, windows and dropped first positions, the live source's exact resume, the shard
writer, and the CLI path on a tiny random Llama (no download). The real SmolLM2 + Austen path
runs with --run-slow when the material is installed (scripts/fetch_real_material.sh)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sae_fast.data import ShardedActivations  # noqa: E402
from sae_fast.hf import LiveActivations, layer_activations, token_windows, write_activation_shards  # noqa: E402


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_windows():
    w = token_windows([[1, 2, 3], [4, 5]], 3, separator=0)
    assert w.tolist() == [[1, 2, 3], [0, 4, 5]]
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows([[1]], 8, separator=None)


@pytest.mark.parametrize("layer", [0, 1])  # (transformers applies the final norm to its last hidden state)
def test_hooked_block_equals_hidden_states(layer):
    model = _tiny_llama()
    ids = torch.randint(0, 97, (5, 9), generator=torch.Generator().manual_seed(1))
    got = layer_activations(model, ids, layer, batch=2)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    assert got.shape == (5 * 8, 24)
    torch.testing.assert_close(got, hs[:, 1:].reshape(-1, 24))
    with pytest.raises(ValueError, match="layer must be"):
        layer_activations(model, ids, 3)


def test_live_source_resumes_exactly_and_shards_match(tmp_path):
    model = _tiny_llama()
    windows = torch.randint(0, 97, (20, 9), generator=torch.Generator().manual_seed(2))
    src = LiveActivations(model, windows, 1, seed=3, windows_per_buffer=6)
    assert src.width == 24 and len(src) == 160
    for _ in range(4):
        src.next_batch(10)
    state = src.state()
    want = src.next_batch(10)[0]
    again = LiveActivations(model, windows, 1, seed=3, windows_per_buffer=6)
    again.load_state(state)
    torch.testing.assert_close(again.next_batch(10)[0], want)
    folder = write_activation_shards(model, windows, 1, tmp_path / "acts", windows_per_shard=7)
    stored = ShardedActivations(folder)
    assert len(stored) == 160 and len(stored.shards) == 3
    torch.testing.assert_close(torch.cat([s.read(0, s.rows) for s in stored.shards]), layer_activations(model, windows, 1))


def test_cli_train_on_a_local_model(tmp_path, capsys):
    from sae_fast import cli

    model = _tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tok = _char_tokenizer(tmp_path / "m")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    run = tmp_path / "run"
    args = ["train", "--model", str(tmp_path / "m"), "--layer", "1", "--corpus", str(tmp_path / "corpus.txt"),
            "--ctx-len", "16", "--num-latents", "48", "--k", "4", "--steps", "12", "--batch-size", "64",
            "--out", str(run)]
    assert tok is not None and cli.main(args) == 0
    assert (run / "activations" / "DONE").exists()
    assert cli.main(args + ["--steps", "15", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "reusing the activations" in out and "done: FVU" in out


def test_cli_model_activations_are_reused_only_when_they_match(tmp_path, capsys):
    """The activations folder records what it holds: another model / layer / window is refused
    (it was reused silently), shards of a killed computation never join a new one, autograd is
    left on after a failure, and bad model arguments are clean errors (rc 2), not tracebacks."""
    from sae_fast import cli

    _tiny_llama().save_pretrained(tmp_path / "m")
    _char_tokenizer(tmp_path / "m")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    run = tmp_path / "run"
    base = ["train", "--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "corpus.txt"), "--num-latents", "48",
            "--k", "4", "--steps", "3", "--batch-size", "64", "--out", str(run)]
    acts = run / "activations"
    acts.mkdir(parents=True)
    for i in range(5):  # a killed run's leftovers: no DONE record, more shards than this run writes
        (acts / f"{i:05d}.safetensors").write_bytes(b"stale")
    assert cli.main(base + ["--layer", "1", "--ctx-len", "16"]) == 0
    fresh = sorted(p.name for p in acts.glob("*.safetensors"))
    assert fresh == ["00000.safetensors"] and len(ShardedActivations(acts)) == 1800 // 16 * 15
    capsys.readouterr()
    for extra, message in ((["--layer", "2", "--ctx-len", "16"], "holds activations of"),
                           (["--layer", "1", "--ctx-len", "8", "--resume"], "--resume: "),
                           (["--layer", "3", "--ctx-len", "16", "--out", str(tmp_path / "r2")], "decoder blocks 0..2"),
                           (["--layer", "1", "--ctx-len", "65", "--out", str(tmp_path / "r3")], "64 positions"),
                           (["--layer", "1", "--ctx-len", "1"], "--ctx-len must be >= 2"),
                           (["--layer", "1", "--max-tokens", "10"], "less than one window")):
        assert cli.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
        assert torch.is_grad_enabled()
    bad_model = ["train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r4")]
    assert cli.main(bad_model) == 2 and "not 'smollm2' nor a local" in capsys.readouterr().err
    bad_corpus = base[:3] + ["--corpus", str(tmp_path / "none.txt"), "--out", str(tmp_path / "r5"), "--layer", "1",
                                  "--ctx-len", "16"]
    assert cli.main(bad_corpus) == 2 and "no such file" in capsys.readouterr().err
    assert cli.main(base + ["--layer", "1", "--ctx-len", "16", "--resume", "--out", str(tmp_path / "r6")]) == 2
    assert "--resume: resume: no checkpoint" in capsys.readouterr().err


def _char_tokenizer(folder):
    """A byte-level tokenizer saved beside the tiny model (tokenizers ships with transformers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i): i - 30 for i in range(32, 127)}
    vocab = {k: v for k, v in vocab.items() if 0 <= v < 97}
    vocab["<unk>"] = 96
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>")
    fast.save_pretrained(folder)
    return fast


@pytest.mark.slow
def test_real_smollm2_austen_path(tmp_path):
    """SmolLM2-135M layer 15 on Austen: a short TopK run lowers FVU well below 1."""
    from sae_fast import cli
    from sae_fast.real import austen_texts, smollm2_gguf

    try:
        smollm2_gguf(), austen_texts()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"real material not installed: {e}")
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "smollm2", "--layer", "15", "--corpus", "austen", "--max-tokens", "8192",
                     "--num-latents", "1024", "--k", "32", "--steps", "60", "--batch-size", "512", "--lr", "4e-3",
                     "--out", str(run)]) == 0
    import json

    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["fvu"] < 0.5
