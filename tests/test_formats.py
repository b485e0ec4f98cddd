"""Checkpoint formats (sae_fast.formats): every loader against the library's own object or,
for Gemma Scope and OpenAI, a plain-torch rendering of their documented math; exports reloaded by
the real libraries; bad files. Checkpoints are built with the libraries' own constructors and
save functions (random weights, odd sizes) where installed; the peers are imported once per module."""

import json
import os

import numpy as np
import pytest
import torch

from sae_fast import ops
from sae_fast.formats import detect_format
from sae_fast.sae import SAEConfig, SparseAutoencoder

# sparsify's CPU decoder would otherwise be its Triton kernel under our interpreter: compare
# against its eager embedding_bag path (the library's own switch, read at import)
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

D, M, K, N = 37, 75, 5, 9
TOL = dict(rtol=1e-5, atol=1e-5)


def _load(path, **kw):
    """The loaders are backend-independent: the plain-torch ops keep this file fast on CPU
    (the Triton kernels are tested against them elsewhere; the OpenAI test runs the default
    backend through a loaded checkpoint too)."""
    return SparseAutoencoder.from_pretrained(path, **{"backend": "reference", **kw})


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def sparsify():
    return pytest.importorskip("sparsify")


@pytest.fixture(scope="module")
def dl():
    from helpers import import_dictionary_learning

    return import_dictionary_learning()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _x(n=N, d=D, seed=7):
    return torch.randn(n, d, generator=_gen(seed)) * 2 + 0.5


def _randomise(params: dict, seed=1, scale=0.3):
    """Random weights (decoder rows of varied norms) and non-zero biases in place."""
    g = _gen(seed)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _dense(codes, m):
    """Our codes as the dense [N, M] activations the libraries return."""
    if isinstance(codes, torch.Tensor):
        return codes
    if isinstance(codes, ops.TopKCodes):
        return torch.zeros(codes.values.shape[0], m, dtype=codes.values.dtype).scatter(1, codes.indices,
                                                                                         codes.values)
    n = codes.row_offsets.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n), codes.row_offsets.diff())
    out = torch.zeros(n, m, dtype=codes.values.dtype)
    out[rows, codes.indices] = codes.values
    return out


def _check(ours, x, acts, x_hat, *, decoded=None):
    """encode / forward / decode of ``ours`` against the dense references; ``decoded``: the
    library's decode of its own codes, which leaves out the skip connection."""
    with torch.no_grad():
        codes = ours.encode(x)
        torch.testing.assert_close(_dense(codes, ours.cfg.num_latents), acts, **TOL)
        y = x_hat if ours.cfg.output_dim != ours.cfg.d_in else None  # a transcoder's target (for its FVU)
        torch.testing.assert_close(ours(x, y).x_hat, x_hat, **TOL)
        torch.testing.assert_close(ours.decode(codes, x), x_hat, **TOL)
        if decoded is not None:
            skip = x @ ours.W_skip.T if ours.W_skip is not None else 0
            torch.testing.assert_close(ours.decode(codes, x) - skip, decoded, **TOL)


# ---------------------------------------------------------------------------------------------
# SAELens


def _saelens_sae(sae_lens, arch, **kw):
    from sae_lens.registry import get_sae_class

    cls, cfg_cls = get_sae_class(arch)
    sae = cls(cfg_cls(d_in=D, d_sae=M, **kw))
    _randomise({k: v for k, v in sae.named_parameters()})
    if "threshold" in dict(sae.named_parameters()):
        with torch.no_grad():
            sae.threshold.copy_(torch.rand(M, generator=_gen(3)) * 0.3)
    return sae


SAELENS_CASES = {
    "topk-rescaled": ("topk", dict(k=K, rescale_acts_by_decoder_norm=True)),
    "topk-no-centring": ("topk", dict(k=K, apply_b_dec_to_input=False)),
    "topk-layer-norm": ("topk", dict(k=K, normalize_activations="layer_norm")),
    "standard": ("standard", {}),
    "jumprelu": ("jumprelu", {}),
    "skip-transcoder": ("skip_transcoder", dict(d_out=23, apply_b_dec_to_input=False)),
    "jumprelu-skip-transcoder": ("jumprelu_skip_transcoder", dict(d_out=23, apply_b_dec_to_input=False)),
}


@pytest.mark.parametrize("case", list(SAELENS_CASES))
def test_saelens_load_and_round_trip(sae_lens, tmp_path, case):
    arch, kw = SAELENS_CASES[case]
    lib = _saelens_sae(sae_lens, arch, **kw)
    lib.save_model(tmp_path / "lib")
    assert detect_format(tmp_path / "lib") == ("saelens", tmp_path / "lib")
    ours = _load(tmp_path / "lib")
    x = _x()
    with torch.no_grad():
        acts = lib.encode(x)
        assert (acts > 0).any(), "a test SAE that never fires checks nothing"
        want = lib(x)
        _check(ours, x, acts, want, decoded=lib.decode(lib.encode(x)) if "skip" in arch else None)
    if kw.get("rescale_acts_by_decoder_norm"):  # folded: our decoder rows are unit norm
        torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(M))

    ours.save(tmp_path / "back", format="saelens")
    back = sae_lens.SAE.load_from_disk(tmp_path / "back")
    assert type(back) is type(lib)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), acts, **TOL)
        torch.testing.assert_close(back(x), want, **TOL)


def test_saelens_batchtopk_training_and_inference_checkpoints(sae_lens, tmp_path):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    lib = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=K))  # rescales by decoder norm
    _randomise(dict(lib.named_parameters()))
    lib.topk_threshold = torch.tensor(0.4, dtype=torch.float64)
    lib.save_model(tmp_path / "train")  # architecture "batchtopk", topk_threshold buffer
    lib.save_inference_model(tmp_path / "infer")  # architecture "jumprelu", threshold vector
    x = _x(n=12)

    ours = _load(tmp_path / "train")
    assert ours.cfg.architecture == "batchtopk" and float(ours.batch_threshold) == pytest.approx(0.4)
    assert not ours.training  # from_pretrained returns eval mode; SAELens' training object selects per batch
    ours.train()
    with torch.no_grad():
        batch_acts = lib.encode(x)  # the batch top-k selection
        torch.testing.assert_close(_dense(ours.encode(x), M), batch_acts, **TOL)
        torch.testing.assert_close(ours(x).x_hat, lib.decode(batch_acts), **TOL)

    inference = sae_lens.SAE.load_from_disk(tmp_path / "infer")
    ours_j = _load(tmp_path / "infer")
    assert ours_j.cfg.architecture == "jumprelu"
    ours.eval()  # the batch threshold at inference is SAELens' JumpReLU with that threshold
    with torch.no_grad():
        acts = inference.encode(x)
        _check(ours_j, x, acts, inference(x))
        _check(ours, x, acts, inference(x))
        ours.save(tmp_path / "back", format="saelens")
        torch.testing.assert_close(sae_lens.SAE.load_from_disk(tmp_path / "back")(x), inference(x), **TOL)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "matryoshka_batchtopk"])
def test_saelens_training_checkpoints(sae_lens, tmp_path, arch):
    """What the SAELens trainer writes mid-run (``save_model`` of the training classes; TopK
    rescales by decoder norms by default; matryoshka only changes the training loss)."""
    from sae_lens.registry import get_sae_training_class

    cls, cfg_cls = get_sae_training_class(arch)
    kw = dict(k=K, matryoshka_widths=[30, M]) if arch == "matryoshka_batchtopk" else dict(k=K) if arch == "topk" else {}
    lib = cls(cfg_cls(d_in=D, d_sae=M, **kw))
    _randomise(dict(lib.named_parameters()))
    if arch == "jumprelu":
        with torch.no_grad():
            lib.threshold.copy_(torch.rand(M, generator=_gen(3)) * 0.3)
    lib.save_model(tmp_path / "ck")
    ours = _load(tmp_path / "ck")
    if arch == "matryoshka_batchtopk":
        ours.train()  # compared with the training object, which selects per batch (eval uses the threshold)
    x = _x()
    with torch.no_grad():
        acts = lib.encode(x)
        _check(ours, x, acts, lib.decode(acts))


def test_saelens_activation_scaler_is_folded(sae_lens, tmp_path):
    """Training checkpoints keep the scale factor / whitening beside the weights (unfolded)."""
    from safetensors.torch import save_file

    lib = _saelens_sae(sae_lens, "topk", k=K, rescale_acts_by_decoder_norm=True,
                       normalize_activations="expected_average_only_in")
    lib.save_model(tmp_path / "scaled")
    with pytest.raises(ValueError, match="activation_scaler.json"):
        _load(tmp_path / "scaled")
    (tmp_path / "scaled" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37,
                                                                               "has_whitening": False}))
    ours = _load(tmp_path / "scaled")
    lib.fold_activation_norm_scaling_factor(0.37)  # SAELens' own fold: what it saves at the end
    x = _x()
    with torch.no_grad():
        _check(ours, x, lib.encode(x), lib(x))

    # whitening statistics as SAELens' ActivationScaler computes and saves them (fp64), and fp32
    g = _gen(5)
    a = torch.eye(D) + 0.1 * torch.randn(D, D, generator=g)
    mean = torch.randn(D, generator=g)
    for stats_dtype in (torch.float64, torch.float32):
        lib = _saelens_sae(sae_lens, "standard", apply_b_dec_to_input=False,
                           normalize_activations="covariance_whitening")
        folder = tmp_path / f"white_{stats_dtype}"
        lib.save_model(folder)
        stats = {"mean": mean, "matrix": a, "inverse_matrix": torch.linalg.inv(a).contiguous()}
        save_file({k: v.to(stats_dtype) for k, v in stats.items()}, str(folder / "activation_whitening.safetensors"))
        (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None, "has_whitening": True}))
        ours = _load(folder)
        lib.fold_activation_whitening(*(v.to(stats_dtype) for v in stats.values()))
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), lib.encode(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours(x).x_hat, lib(x), rtol=1e-4, atol=1e-4)


def test_saelens_bad_files(sae_lens, tmp_path):
    from safetensors.torch import load_file, save_file

    lib = _saelens_sae(sae_lens, "jumprelu")
    d = tmp_path / "j"
    lib.save_model(d)
    cfg = json.loads((d / "cfg.json").read_text())
    w = load_file(str(d / "sae_weights.safetensors"))
    cases = [
        ({**cfg, "architecture": "gated"}, w, "architecture 'gated'"),
        ({**cfg, "normalize_activations": "constant_norm_rescale"}, w, "constant_norm_rescale"),
        ({k: v for k, v in cfg.items() if k != "d_sae"}, w, "missing key 'd_sae'"),
        (cfg, {k: v for k, v in w.items() if k != "threshold"}, "missing key 'threshold'"),
        (cfg, {**w, "W_dec": w["W_dec"][:, :-1].contiguous()}, r"W_dec has shape \(75, 36\)"),
        (cfg, {**w, "b_gate": w["b_enc"].clone()}, r"unexpected keys \['b_gate'\]"),
        ({**cfg, "metadata": "v6"}, w, "metadata must be a JSON object"),
        ({**cfg, "architecture": "topk", "k": 3, "activation_fn_kwargs": "k=3"}, w,
         "activation_fn_kwargs must be a JSON object"),
    ]
    for bad_cfg, bad_w, match in cases:
        (d / "cfg.json").write_text(json.dumps(bad_cfg))
        save_file(bad_w, str(d / "sae_weights.safetensors"))
        with pytest.raises(ValueError, match=match) as err:
            _load(d)
        assert str(d) in str(err.value)
    # architectures SAELens cannot express
    topk_transcoder = SparseAutoencoder(SAEConfig(d_in=D, num_latents=M, k=K, d_out=9, apply_b_dec_to_input=False))
    with pytest.raises(ValueError, match="TopK transcoder"):
        topk_transcoder.save(tmp_path / "x", format="saelens")
    unset = SparseAutoencoder(SAEConfig(d_in=D, num_latents=M, k=K, architecture="batchtopk"))
    with pytest.raises(ValueError, match="no inference threshold"):
        unset.save(tmp_path / "x", format="saelens")


# ---------------------------------------------------------------------------------------------
# sparsify


def _sparsify_coder(sparsify, **kw):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D, SparseCoderConfig(k=K, **kw))
    _randomise(dict(coder.named_parameters()))
    return coder


def _sparsify_refs(coder, x):
    with torch.no_grad():
        enc = coder.encode(x)
        acts = torch.zeros(x.shape[0], coder.num_latents).scatter(1, enc.top_indices, enc.top_acts)
        return acts, coder(x).sae_out, coder.decode(enc.top_acts, enc.top_indices)


@pytest.mark.parametrize("kw", [dict(num_latents=M), dict(num_latents=M, skip_connection=True, transcode=True),
                                dict(num_latents=0, expansion_factor=2)], ids=["sae", "skip-transcode", "expansion"])
def test_sparsify_load_and_round_trip(sparsify, tmp_path, kw):
    coder = _sparsify_coder(sparsify, **kw)
    coder.save_to_disk(tmp_path / "lib")
    ours = _load(tmp_path / "lib")
    assert ours.cfg.num_latents == coder.num_latents and ours.cfg.apply_b_dec_to_input == (not coder.cfg.transcode)
    x = _x()
    acts, out, decoded = _sparsify_refs(coder, x)
    _check(ours, x, acts, out, decoded=decoded)

    ours.save(tmp_path / "back", format="sparsify")
    back = sparsify.SparseCoder.load_from_disk(tmp_path / "back")
    assert back.cfg.transcode == coder.cfg.transcode and back.cfg.skip_connection == coder.cfg.skip_connection
    b_acts, b_out, _ = _sparsify_refs(back, x)
    torch.testing.assert_close(b_acts, acts, **TOL)
    torch.testing.assert_close(b_out, out, **TOL)


def test_sparsify_older_key_layout(sparsify, tmp_path):
    from safetensors.torch import save_file

    coder = _sparsify_coder(sparsify, num_latents=M)
    coder.save_to_disk(tmp_path / "old")
    sd = {"W_enc": coder.encoder.weight.detach().T.contiguous(), "b_enc": coder.encoder.bias.detach(),
          "W_dec": coder.W_dec.detach(), "b_dec": coder.b_dec.detach()}
    save_file(sd, str(tmp_path / "old" / "sae.safetensors"))
    ours = _load(tmp_path / "old" / "sae.safetensors")
    x = _x()
    acts, out, _ = _sparsify_refs(coder, x)
    _check(ours, x, acts, out)


def test_sparsify_hookpoint_folder_and_bad_files(sparsify, tmp_path):
    for hook in ("layers.3", "layers.10.mlp"):
        _sparsify_coder(sparsify, num_latents=M).save_to_disk(tmp_path / "run" / hook)
    with pytest.raises(ValueError, match=r"2 checkpoints in subfolders .*layers.10.mlp, layers.3.*pass one"):
        _load(tmp_path / "run")
    d = tmp_path / "run" / "layers.3"
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(ValueError, match="groupmax"):
        _load(d)
    (d / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 76}))
    with pytest.raises(ValueError, match=r"sae.safetensors: encoder.weight has shape \(75, 37\), expected \(76, 37\)"):
        _load(d)
    relu = SparseAutoencoder(SAEConfig(d_in=D, num_latents=M, architecture="relu"))
    with pytest.raises(ValueError, match="sparsify expresses TopK"):
        relu.save(tmp_path / "x", format="sparsify")


# ---------------------------------------------------------------------------------------------
# dictionary_learning


def _dl_save(ae, folder, dict_class, **trainer):
    """What dictionary_learning's trainSAE writes: ``ae.pt`` (the state dict) + ``config.json``."""
    folder.mkdir(parents=True)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, folder / "ae.pt")
    cfg = {"trainer": {"dict_class": dict_class, "activation_dim": ae.activation_dim, "dict_size": ae.dict_size,
                       **trainer}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("dict_class", ["AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder", "AutoEncoder",
                                        "AutoEncoderNew"])
def test_dictionary_learning(dl, tmp_path, dict_class):
    from dictionary_learning import dictionary as dicts
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    classes = {"AutoEncoderTopK": AutoEncoderTopK, "BatchTopKSAE": BatchTopKSAE,
               "JumpReluAutoEncoder": dicts.JumpReluAutoEncoder, "AutoEncoder": dicts.AutoEncoder,
               "AutoEncoderNew": dicts.AutoEncoderNew}
    topk = dict_class in ("AutoEncoderTopK", "BatchTopKSAE")
    ae = classes[dict_class](D, M, K) if topk else classes[dict_class](D, M)
    _randomise(dict(ae.named_parameters()))
    with torch.no_grad():
        if dict_class == "BatchTopKSAE":
            ae.threshold.fill_(0.35)
        if dict_class == "JumpReluAutoEncoder":
            ae.threshold.copy_(torch.rand(M, generator=_gen(4)) * 0.3)
    folder = _dl_save(ae, tmp_path / "trainer_0", dict_class, **({"k": K} if topk else {}))
    if dict_class == "AutoEncoder":
        # what its users get: the library's loader scales the decoder columns (norms ~1.3-2.5
        # here) to unit norm and the encoder to match; activations change, reconstructions not
        assert not torch.allclose(ae.decoder.weight.norm(dim=0), torch.ones(M))
        ae = dicts.AutoEncoder.from_pretrained(folder / "ae.pt")
    ours = _load(folder)
    assert not ours.training  # eval, like transformers: BatchTopKSAE's default encode uses its threshold
    x = _x(n=12)
    with torch.no_grad():
        _check(ours, x, ae.encode(x), ae(x))
        if dict_class == "BatchTopKSAE":  # training mode: the batch top-k selection
            ours.train()
            torch.testing.assert_close(_dense(ours.encode(x), M), ae.encode(x, use_threshold=False), **TOL)
    # a second library reads what the first one wrote, through ours
    if dict_class in ("JumpReluAutoEncoder", "AutoEncoderTopK"):
        sae_lens = pytest.importorskip("sae_lens")
        ours.save(tmp_path / "saelens", format="saelens")
        with torch.no_grad():
            torch.testing.assert_close(sae_lens.SAE.load_from_disk(tmp_path / "saelens")(x), ae(x), **TOL)


def test_dictionary_learning_bad_files(dl, tmp_path):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    ae = AutoEncoderTopK(D, M, K)
    folder = _dl_save(ae, tmp_path / "t", "GatedAutoEncoder")
    with pytest.raises(ValueError, match="dict_class 'GatedAutoEncoder' is not supported"):
        _load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json: missing"):
        _load(folder / "ae.pt")
    _dl_save(ae, tmp_path / "u", "AutoEncoderTopK", k=K + 1)
    with pytest.raises(ValueError, match="k buffer is 5"):
        _load(tmp_path / "u")


# ---------------------------------------------------------------------------------------------
# Gemma Scope and OpenAI: files written from the documented layouts, plain-torch references


def test_gemma_scope_params_npz(tmp_path):
    g = _gen(11)
    p = {"W_enc": torch.randn(D, M, generator=g) * 0.3, "W_dec": torch.randn(M, D, generator=g) * 0.3,
         "b_enc": torch.randn(M, generator=g) * 0.3, "b_dec": torch.randn(D, generator=g),
         "threshold": torch.rand(M, generator=g) * 0.5}
    (tmp_path / "layer_5" / "width_16k" / "average_l0_50").mkdir(parents=True)
    folder = tmp_path / "layer_5" / "width_16k" / "average_l0_50"
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items()})
    ours = _load(folder)
    assert not ours.cfg.apply_b_dec_to_input and ours.cfg.architecture == "jumprelu"
    x = _x()
    pre = x @ p["W_enc"] + p["b_enc"]  # no b_dec subtraction on the input
    acts = torch.relu(pre) * (pre > p["threshold"])
    assert 0 < (acts > 0).sum() < acts.numel()
    _check(ours, x, acts, acts @ p["W_dec"] + p["b_dec"])

    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items() if k != "threshold"})
    with pytest.raises(ValueError, match="params.npz: missing key 'threshold'"):
        _load(folder)


def _openai_sd(activation, g):
    sd = {"pre_bias": torch.randn(D, generator=g), "encoder.weight": torch.randn(M, D, generator=g) * 0.3,
          "latent_bias": torch.randn(M, generator=g) * 0.3, "decoder.weight": torch.randn(D, M, generator=g) * 0.3,
          "stats_last_nonzero": torch.zeros(M, dtype=torch.long),
          "latents_activation_frequency": torch.ones(M), "latents_mean_square": torch.zeros(M),
          "activation": activation}
    if activation == "TopK":
        sd["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"}
    return sd


def _openai_reference(sd, x):
    """sparse_autoencoder.model.Autoencoder: LN (no affine, eps 1e-5, unbiased std) for TopK,
    latents = act((x - pre_bias) @ encoderᵀ + latent_bias), recons = latents @ decoderᵀ + pre_bias."""
    normalize = sd["activation"] == "TopK"
    if normalize:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if normalize:
        top = pre.topk(K, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        acts = torch.relu(pre)
    recons = acts @ sd["decoder.weight"].T + sd["pre_bias"]
    return acts, (recons * std + mu if normalize else recons), recons


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_openai_state_dict(tmp_path, activation):
    sd = _openai_sd(activation, _gen(12))
    torch.save(sd, tmp_path / "v5_32k_layer_8.pt")
    assert detect_format(tmp_path)[0] == "openai"
    ours = _load(tmp_path / "v5_32k_layer_8.pt", backend=None)  # the default (Triton, interpreted on CPU)
    assert ours.cfg.input_norm == ("layer_norm" if activation == "TopK" else "none")
    x = _x() * 3 + 1  # a scale and offset the layer norm must remove and restore
    acts, recons, _ = _openai_reference(sd, x)
    _check(ours, x, acts, recons)
    with torch.no_grad():  # without x the decode stays in normalised space (the codes cannot tell)
        torch.testing.assert_close(ours.decode(ours.encode(x)), _openai_reference(sd, x)[2], **TOL)
    # the option survives our own format and SAELens' (its "layer_norm" is the same LN)
    for fmt in ("sae_fast", "saelens"):  # into one folder: the cfg.json written last decides
        ours.save(tmp_path / "ours", format=fmt)
        assert detect_format(tmp_path / "ours")[0] == fmt
        back = _load(tmp_path / "ours")
        assert back.cfg.input_norm == ours.cfg.input_norm
        with torch.no_grad():
            torch.testing.assert_close(back(x).x_hat, recons, **TOL)


def test_openai_bad_files(tmp_path):
    sd = _openai_sd("TopK", _gen(13))
    sd["activation_state_dict"] = {"k": K, "postact_fn": "Identity"}
    torch.save(sd, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="postact_fn='Identity'"):
        _load(tmp_path / "a.pt")
    sd = _openai_sd("ReLU", _gen(13))
    del sd["latent_bias"]
    torch.save(sd, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="b.pt: missing key 'latent_bias'"):
        _load(tmp_path / "b.pt")
    torch.save({"pre_bias": torch.zeros(D), "evil": _Pickled()}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="c.pt: cannot be read as a weights-only"):
        _load(tmp_path / "c.pt")


class _Pickled:
    """An arbitrary object: the weights-only unpickler must refuse it."""


# ---------------------------------------------------------------------------------------------
# our own format, the input norm, detection


def test_sae_fast_format_and_input_norm(tmp_path):
    cfg = SAEConfig(d_in=D, num_latents=M, k=K, input_norm="layer_norm", skip_connection=True)
    sae = SparseAutoencoder(cfg)
    _randomise({"b_enc": sae.b_enc, "b_dec": sae.b_dec, "W_skip": sae.W_skip}, seed=9)
    sae.save(tmp_path / "ck")
    assert detect_format(tmp_path / "ck" / "cfg.json") == ("sae_fast", tmp_path / "ck")
    back = _load(tmp_path / "ck", dtype=torch.float64, backend="reference")
    assert back.cfg == cfg and back.W_enc.dtype == torch.float64
    x = _x()
    with torch.no_grad():
        mu, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        xn = (x - mu) / (std + 1e-5)
        pre = (xn - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        top = pre.topk(K, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        # the skip connection acts on the raw input, after the norm is undone (SAELens' order)
        want = (acts @ sae.W_dec + sae.b_dec) * std + mu + x @ sae.W_skip.T
        _check(sae, x, acts, want)
        torch.testing.assert_close(back(x.double()).x_hat.float(), want, **TOL)
    with pytest.raises(ValueError, match="input_norm"):
        SAEConfig(d_in=D, num_latents=M, input_norm="rms")


def test_input_norm_auxk_in_raw_space():
    """AuxK decodes the dead latents in normalised space; the residual is raw: scaled by the std."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=D, num_latents=M, k=K, k_aux=7, input_norm="layer_norm"),
                            dtype=torch.float64, backend="reference")
    _randomise({"b_enc": sae.b_enc, "b_dec": sae.b_dec}, seed=10)
    x = _x().double() * 4 + 2
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        out = sae(x, dead_mask=dead)
        mu, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        pre = ((x - mu) / (std + 1e-5) - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        aux = pre.masked_fill(~dead, -torch.inf).topk(7, dim=-1)
        e_hat = torch.zeros_like(pre).scatter(-1, aux.indices, torch.relu(aux.values)) @ sae.W_dec * std
        resid = x - out.x_hat
        want = min(int(dead.sum()) / 7, 1.0) * (resid - e_hat).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()
        torch.testing.assert_close(out.aux_loss, want.float())


def test_unrecognised_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"not a recognised SAE checkpoint .*notes.txt"):
        _load(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="cfg.json is missing"):
        _load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 3, "d_sae": 4}))
    (tmp_path / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="sae_weights.safetensors: not a readable safetensors"):
        _load(tmp_path)
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "nope")
    with pytest.raises(ValueError, match="format must be one of"):
        SparseAutoencoder(SAEConfig(d_in=D, num_latents=M, k=K)).save(tmp_path / "z", format="onnx")


# ---------------------------------------------------------------------------------------------
# conventions that are easy to lose: old configs, exact thresholds, strict booleans, errors that
# name the file


def test_saelens_pre6_topk_config(sae_lens, tmp_path):
    """SAELens < 6 wrote TopK SAEs as architecture "standard" + activation_fn_str "topk"; SAELens
    still loads them as TopK (handle_pre_6_0_config), and so must we."""
    lib = _saelens_sae(sae_lens, "topk", k=K)
    lib.save_model(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    for key in ("metadata", "k", "rescale_acts_by_decoder_norm", "sae_lens_version"):
        cfg.pop(key, None)
    cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": K},
               sae_lens_training_version="5.5.0")
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    ref = sae_lens.SAE.load_from_disk(tmp_path / "old")
    ours = _load(tmp_path / "old")
    assert ours.cfg.architecture == "topk" and ours.cfg.k == K
    x = _x()
    with torch.no_grad():
        _check(ours, x, ref.encode(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_jumprelu_thresholds_load_exactly(tmp_path, dtype):
    """The module trains log θ (kept in fp32 at least); loading θ must not move it: in 16 bits the
    thresholds equal the file's rounded to that dtype; in fp32 exp(fp32(log θ)) can only be as
    close as the log's rounding allows, |log θ|/2 ulps, plus the exp's own."""
    g = _gen(21)
    m = 256
    theta = torch.rand(m, generator=g) * 0.5 + 1e-3
    arrays = {"W_enc": torch.randn(D, m, generator=g), "b_enc": torch.randn(m, generator=g),
              "W_dec": torch.randn(m, D, generator=g), "b_dec": torch.randn(D, generator=g), "threshold": theta}
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in arrays.items()})
    ours = _load(tmp_path / "params.npz", dtype=dtype)
    got = ours.threshold.detach()
    if dtype == torch.float32:
        rel = ((got.double() - theta.double()) / theta.double()).abs()
        assert bool((rel <= 2.0 ** -24 * (theta.double().log().abs() + 2)).all())
    else:
        assert torch.equal(got.to(dtype), theta.to(dtype))
    ours.save(tmp_path / "back")  # our own format keeps them as well
    back = SparseAutoencoder.load(tmp_path / "back", backend="reference")
    assert torch.equal(back.threshold.detach().to(dtype), got.to(dtype))


def test_dictionary_learning_batchtopk_without_threshold_warns(dl, tmp_path):
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE

    ae = BatchTopKSAE(D, M, K)  # threshold -1: saved before the trainer's threshold_start_step
    _randomise(dict(ae.named_parameters()))
    folder = _dl_save(ae, tmp_path / "early", "BatchTopKSAE", k=K)
    with pytest.warns(UserWarning, match="no inference threshold yet"):
        ours = _load(folder)
    assert float(ours.batch_threshold) < 0


def test_dictionary_learning_topk_without_threshold_buffer(dl, tmp_path):
    """AutoEncoderTopK's threshold buffer only serves its non-default encode; files from versions
    without it load."""
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    ae = AutoEncoderTopK(D, M, K)
    _randomise(dict(ae.named_parameters()))
    folder = _dl_save(ae, tmp_path / "t", "AutoEncoderTopK", k=K)
    sd = torch.load(folder / "ae.pt", weights_only=True)
    del sd["threshold"]
    torch.save(sd, folder / "ae.pt")
    x = _x()
    with torch.no_grad():
        _check(_load(folder), x, ae.encode(x), ae(x))


def test_config_values_are_checked_and_errors_name_the_file(sae_lens, sparsify, tmp_path):
    lib = _saelens_sae(sae_lens, "topk", k=K)
    lib.save_model(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    for bad, match in [({"apply_b_dec_to_input": "false"}, "apply_b_dec_to_input must be true or false"),
                       ({"rescale_acts_by_decoder_norm": "false"}, "rescale_acts_by_decoder_norm must be true"),
                       ({"k": M + 1}, f"k={M + 1} exceeds num_latents={M}")]:
        (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError, match=match) as err:
            _load(tmp_path / "s")
        assert str(tmp_path / "s" / "cfg.json") in str(err.value)

    _sparsify_coder(sparsify, num_latents=M).save_to_disk(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "cfg.json").read_text())
    (tmp_path / "p" / "cfg.json").write_text(json.dumps({**cfg, "transcode": "false"}))
    with pytest.raises(ValueError, match="transcode must be true or false"):
        _load(tmp_path / "p")

    SparseAutoencoder(SAEConfig(d_in=D, num_latents=M, k=K)).save(tmp_path / "o")
    cfg = json.loads((tmp_path / "o" / "cfg.json").read_text())
    for bad, match in [({"dtype": "float33"}, "dtype 'float33'"), ({"k": M + 1}, "exceeds num_latents")]:
        (tmp_path / "o" / "cfg.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError, match=match) as err:
            SparseAutoencoder.load(tmp_path / "o")
        assert "cfg.json" in str(err.value)


def test_saelens_transcoder_layer_norm_is_refused(sae_lens, tmp_path):
    """SAELens transcoders normalise their input and never undo it on the output; our input_norm
    undoes it, so neither direction can be expressed faithfully."""
    lib = _saelens_sae(sae_lens, "transcoder", d_out=23, apply_b_dec_to_input=False,
                       normalize_activations="layer_norm")
    lib.save_model(tmp_path / "tc")
    with pytest.raises(ValueError, match="normalises the input only"):
        _load(tmp_path / "tc")
    ours = SparseAutoencoder(SAEConfig(d_in=D, num_latents=M, architecture="relu", d_out=23,
                                       apply_b_dec_to_input=False, input_norm="layer_norm"))
    with pytest.raises(ValueError, match="never undoes|without undoing"):
        ours.save(tmp_path / "x", format="saelens")
