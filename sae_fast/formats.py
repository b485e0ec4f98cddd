"""Read and write the SAE checkpoint formats people publish, mapped to sae_fast's layout.

Ours is latent-major: ``W_enc [M, d_in]``, ``b_enc [M]``, ``W_dec [M, d_out]``, ``b_dec [d_out]``,
``pre = (x - b_dec·c) @ W_encᵀ + b_enc`` with ``c = cfg.apply_b_dec_to_input``. Each loader maps
its library's names, transposes and centring rule onto that, and folds whatever the library does
around the encoder (decoder-norm rescaling, activation scaling, whitening) into the weights, so
``SparseAutoencoder.from_pretrained(path)`` computes what the library's own object computes:

==================== =========================================== ==================================
format               files                                       architectures
==================== =========================================== ==================================
sae_fast             ``cfg.json`` + ``model.safetensors``        all of ours
saelens              ``cfg.json`` + ``sae_weights.safetensors``  standard, topk, jumprelu,
                                                                 (matryoshka) batchtopk training
                                                                 checkpoints, (skip/jumprelu)
                                                                 transcoders
sparsify             ``cfg.json`` + ``sae.safetensors``          topk (+ W_skip, transcode;
                                                                 multi_topk is a training loss:
                                                                 our forward reconstructs from k
                                                                 where sparsify's sae_out then
                                                                 uses 4k)
dictionary_learning  ``ae.pt`` + ``config.json``                 AutoEncoderTopK, BatchTopKSAE,
                                                                 JumpReluAutoEncoder, AutoEncoder
                                                                 (decoder normalised as its
                                                                 from_pretrained does),
                                                                 AutoEncoderNew
gemma_scope          ``params.npz``                              JumpReLU (no b_dec on input)
openai               ``*.pt`` state dict                         TopK (+ per-row layer norm), ReLU
==================== =========================================== ==================================

Only safe readers are used: safetensors, ``numpy.load(allow_pickle=False)`` and
``torch.load(weights_only=True)``. A missing key, a wrong shape, an unknown architecture or
an unrecognised folder raises ValueError naming the file and the key. ``save`` writes the
saelens and sparsify formats (what ``SAE.load_from_disk`` / ``SparseCoder.load_from_disk``
read); an architecture a format cannot express raises ValueError.

The module comes back in eval mode, as ``transformers``' ``from_pretrained`` does: a BatchTopK
SAE then encodes with its stored inference threshold, which is what dictionary_learning's
``BatchTopKSAE.encode`` and SAELens' inference saves do; call ``.train()`` to fine-tune.
SAELens ``reshape_activations="hook_z"`` SAEs take ``[..., n_heads·d_head]`` inputs here:
flatten the head dimensions first (the function is the same).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from .sae import SAEConfig

FORMATS = ("sae_fast", "saelens", "sparsify", "dictionary_learning", "gemma_scope", "openai")
EXPORT_FORMATS = ("sae_fast", "saelens", "sparsify")

_SAE_FAST_WEIGHTS = "model.safetensors"
_SAELENS_WEIGHTS = "sae_weights.safetensors"
_SPARSIFY_WEIGHTS = "sae.safetensors"
_SAELENS_SCALER = "activation_scaler.json"
_SAELENS_WHITENING = "activation_whitening.safetensors"
# SAELens v6 config layout (handle_config_defaulting treats configs without a version as pre-6)
_SAELENS_CFG_VERSION = "6.0.0"


# ---------------------------------------------------------------------------------------------
# detection


def detect_format(path: Union[str, Path]) -> tuple[str, Path]:
    """(format name, the file or folder its loader reads) for a checkpoint folder or file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"from_pretrained: {path} does not exist")
    if path.is_file():
        name = path.name
        if name.endswith(".npz"):
            return "gemma_scope", path
        if name.endswith((".pt", ".pth")):
            return _pt_format(path), path
        if name in ("cfg.json", _SAE_FAST_WEIGHTS, _SAELENS_WEIGHTS, _SPARSIFY_WEIGHTS):
            return detect_format(path.parent)
        if name == "config.json" and (path.parent / "ae.pt").is_file():
            return "dictionary_learning", path.parent / "ae.pt"
        raise ValueError(f"from_pretrained: {path} is not a recognised SAE checkpoint file "
                         "(expected a folder, params.npz, a .pt state dict, or a cfg.json / *.safetensors "
                         "of sae_fast, SAELens or sparsify)")
    found = _folder_format(path)
    if found is not None:
        return found
    subs = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_checkpoint(p))
    if subs:
        shown = ", ".join(subs[:8]) + (", ..." if len(subs) > 8 else "")
        raise ValueError(f"from_pretrained: {path} holds {len(subs)} checkpoints in subfolders (one per hookpoint: "
                         f"{shown}); pass one of them, e.g. {path / subs[0]}")
    files = sorted(p.name for p in path.iterdir())[:12]
    raise ValueError(f"from_pretrained: {path} is not a recognised SAE checkpoint (files: {files}); expected "
                     f"cfg.json + one of {_SAE_FAST_WEIGHTS} (sae_fast) / {_SAELENS_WEIGHTS} (SAELens) / "
                     f"{_SPARSIFY_WEIGHTS} (sparsify), ae.pt (+ config.json, dictionary_learning), params.npz "
                     "(Gemma Scope) or a .pt state dict (OpenAI)")


def _folder_format(path: Path) -> Optional[tuple[str, Path]]:
    has_cfg = (path / "cfg.json").is_file()
    found = [fmt for weights, fmt in ((_SAE_FAST_WEIGHTS, "sae_fast"), (_SAELENS_WEIGHTS, "saelens"),
                                      (_SPARSIFY_WEIGHTS, "sparsify")) if (path / weights).is_file()]
    if found:
        if not has_cfg:
            raise ValueError(f"from_pretrained: {path} holds {found[0]} weights but {path / 'cfg.json'} is missing "
                             f"(a {found[0]} checkpoint needs both)")
        if len(found) > 1:  # several formats saved into one folder: cfg.json (written last) decides
            raw = _read_json(path / "cfg.json")
            fmt = "sae_fast" if raw.get("format") == "sae_fast" else "saelens" if "d_sae" in raw else "sparsify"
            if fmt not in found:
                raise ValueError(f"from_pretrained: {path / 'cfg.json'} looks like a {fmt} config, but "
                                 f"{path} holds {found} weights")
            return fmt, path
        return found[0], path
    if (path / "ae.pt").is_file():
        return "dictionary_learning", path / "ae.pt"
    if (path / "params.npz").is_file():
        return "gemma_scope", path / "params.npz"
    pts = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".pt", ".pth"))
    if len(pts) == 1:
        return _pt_format(pts[0]), pts[0]
    return None


def _is_checkpoint(path: Path) -> bool:
    try:
        return _folder_format(path) is not None
    except ValueError:  # a broken checkpoint is still one the user may mean
        return True


def _pt_format(path: Path) -> str:
    sd = _torch_load(path, mmap=True)  # only the keys are needed: map, don't read
    return "openai" if ("pre_bias" in sd or "latent_bias" in sd) else "dictionary_learning"


# ---------------------------------------------------------------------------------------------
# readers that name the file and the key


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None


def _torch_load(path: Path, mmap: bool = False) -> dict:
    """A ``.pt`` state dict, through the weights-only unpickler (never arbitrary pickle)."""
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) files
    except Exception as e:  # the weights-only unpickler raises several types
        raise ValueError(f"{path}: cannot be read as a weights-only torch state dict: {e}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict (a dict of tensors), got {type(sd).__name__}")
    return sd


def _cfg_int(cfg: dict, key: str, file: Path, default=None) -> int:
    v = cfg.get(key, default)
    if v is None:
        raise ValueError(f"{file}: missing key {key!r}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{file}: {key} must be an integer, got {v!r}")
    return v


def _cfg_bool(cfg: dict, key: str, file: Path, default: bool) -> bool:
    """A JSON boolean; anything else (a string "false" is truthy in Python) is an error."""
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{file}: {key} must be true or false, got {v!r}")
    return v


def _config(file: Path, **fields) -> SAEConfig:
    """SAEConfig whose validation errors name the file they came from."""
    try:
        return SAEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from None


def _saelens_version_major(raw: dict) -> Optional[int]:
    metadata = raw.get("metadata") or {}
    v = raw.get("sae_lens_version") or (metadata.get("sae_lens_version") if isinstance(metadata, dict) else None)
    try:
        return int(str(v).split(".")[0]) if v else None
    except ValueError:
        return None


class _Tensors:
    """A file's tensors, taken by key with the expected shape; keys nobody took are an error
    (an unknown key may change the function: never load it silently wrong)."""

    def __init__(self, file: Path, tensors: dict, ignore=()):
        self.file, self.tensors = file, dict(tensors)
        self.used = {k for k in ignore if k in self.tensors}

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple, what: str = "") -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"{self.file}: missing key {key!r}{' (' + what + ')' if what else ''}; "
                             f"keys present: {sorted(self.tensors)}")
        t = self.tensors[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{self.file}: {key} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.file}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                             f"{' (' + what + ')' if what else ''}")
        if not t.is_floating_point():
            raise ValueError(f"{self.file}: {key} must be a floating-point tensor, got {t.dtype}")
        self.used.add(key)
        return t

    def shape_of(self, key: str, ndim: int) -> tuple:
        if key not in self.tensors:
            raise ValueError(f"{self.file}: missing key {key!r}; keys present: {sorted(self.tensors)}")
        t = self.tensors[key]
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{self.file}: {key} must be a {ndim}-d tensor, got {got}")
        return tuple(t.shape)

    def finish(self) -> None:
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            raise ValueError(f"{self.file}: unexpected keys {extra} (not part of this format's "
                             "architecture; refusing to load a checkpoint whose function they may change)")


def _f(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 for folding arithmetic (fp32 and fp64 files keep their precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _build(cls, cfg: SAEConfig, tensors: dict, *, device, dtype, backend):
    """A module with ``tensors`` (canonical names and shapes) copied into its parameters."""
    sae = cls(cfg, device=device, dtype=dtype, init=False, backend=backend)
    with torch.no_grad():
        for key, t in tensors.items():
            if key == "threshold":
                # the module keeps log θ; θ <= 0 acts like 0 under relu(pre)·H(pre - θ)
                sae.log_threshold.copy_(t.double().clamp_min(1e-30).log())
            elif key == "batch_threshold":
                sae.batch_threshold.fill_(float(t))
            else:
                getattr(sae, key).copy_(t)
    return sae


# ---------------------------------------------------------------------------------------------
# loaders


def load(cls, path: Union[str, Path], *, device=None, dtype: torch.dtype = torch.float32,
         backend: Optional[str] = None):
    """``SparseAutoencoder.from_pretrained``: detect the format at ``path`` and load it."""
    fmt, where = detect_format(path)
    if fmt == "sae_fast":
        return cls.load(where, device=device, dtype=dtype, backend=backend).eval()
    cfg, tensors = _LOADERS[fmt](where)
    return _build(cls, cfg, tensors, device=device, dtype=dtype, backend=backend).eval()


def _fold_decoder_norms(t: dict) -> None:
    """Rescaling pre-activations by the decoder row norms n (SAELens ``rescale_acts_by_decoder_norm``)
    equals encoder rows and biases times n and decoder rows divided by n: the same selection, the
    same values, the same reconstruction, with no per-call rescaling."""
    n = _f(t["W_dec"]).norm(dim=1).clamp_min(1e-30)
    t["W_enc"] = _f(t["W_enc"]) * n[:, None]
    t["b_enc"] = _f(t["b_enc"]) * n
    t["W_dec"] = _f(t["W_dec"]) / n[:, None]


def _fold_whitening(t: dict, mean, matrix, inverse, apply_b_dec: bool) -> None:
    """An SAE trained on z = (x - mean) @ A, whose output is mapped back as x̂ = ẑ @ A⁻¹ + mean,
    is an SAE on x with W_enc·Aᵀ, W_dec·A⁻¹, b_dec·A⁻¹ + mean (and, without b_dec centring,
    b_enc - W_enc'·mean)."""
    # one dtype for the fold: SAELens computes and saves its whitening statistics in fp64
    dt = _f(torch.empty(0, dtype=torch.promote_types(t["W_enc"].dtype, matrix.dtype))).dtype
    mean, matrix, inverse = mean.to(dt), matrix.to(dt), inverse.to(dt)
    W_enc = t["W_enc"].to(dt) @ matrix.T
    t["W_enc"] = W_enc
    t["W_dec"] = t["W_dec"].to(dt) @ inverse
    t["b_dec"] = t["b_dec"].to(dt) @ inverse + mean
    if not apply_b_dec:
        t["b_enc"] = t["b_enc"].to(dt) - W_enc @ mean


def _fold_scaling(t: dict, s: float) -> None:
    """An SAE trained on s·x, its output divided by s, is an SAE on x with W_enc·s, W_dec/s, b_dec/s."""
    t["W_enc"] = _f(t["W_enc"]) * s
    t["W_dec"] = _f(t["W_dec"]) / s
    t["b_dec"] = _f(t["b_dec"]) / s


# SAELens architecture -> (ours, transcoder, skip connection)
_SAELENS_ARCHS = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "batchtopk": ("batchtopk", False, False),  # a training checkpoint (inference saves are jumprelu)
    "matryoshka_batchtopk": ("batchtopk", False, False),  # matryoshka only shapes the training loss
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}


def _load_saelens(folder: Path):
    cfg_path, w_path = folder / "cfg.json", folder / _SAELENS_WEIGHTS
    raw = _read_json(cfg_path)
    arch = raw.get("architecture")
    fn_kwargs = raw.get("activation_fn_kwargs") or {}
    for key, value in (("metadata", raw.get("metadata")), ("activation_fn_kwargs", fn_kwargs)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{cfg_path}: {key} must be a JSON object, got {value!r}")
    major = _saelens_version_major(raw)
    if major is None or major < 6:
        # SAELens rewrites pre-6 configs (no version, or below 6) as it loads them: a topk
        # activation with a k is a TopK SAE whatever "architecture" says (old TopK saves wrote
        # "standard"); otherwise the architecture defaults to standard.
        activation = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
        if activation == "topk" and isinstance(fn_kwargs, dict) and fn_kwargs.get("k") is not None:
            arch = "topk"
        elif arch is None:
            arch = "standard"
    if arch not in _SAELENS_ARCHS:
        raise ValueError(f"{cfg_path}: architecture {arch!r} is not supported (supported: "
                         f"{sorted(_SAELENS_ARCHS)}; gated, abstopk, temporal and matching-pursuit SAEs have "
                         "no sae_fast equivalent)")
    ours, transcoder, skip = _SAELENS_ARCHS[arch]
    d_in, m = _cfg_int(raw, "d_in", cfg_path), _cfg_int(raw, "d_sae", cfg_path)
    d_out = _cfg_int(raw, "d_out", cfg_path) if transcoder else d_in
    apply_b_dec = _cfg_bool(raw, "apply_b_dec_to_input", cfg_path, True)
    if transcoder and apply_b_dec:
        raise ValueError(f"{cfg_path}: apply_b_dec_to_input=True is not valid for a SAELens transcoder")
    k = 32
    if ours in ("topk", "batchtopk"):
        k_raw = raw["k"] if "k" in raw else fn_kwargs.get("k")
        if k_raw is None:
            raise ValueError(f"{cfg_path}: missing key 'k'")
        if isinstance(k_raw, bool) or not isinstance(k_raw, (int, float)) or float(k_raw) != int(k_raw):
            raise ValueError(f"{cfg_path}: k must be an integer for sae_fast's {ours}, got {k_raw!r}")
        k = int(k_raw)
    norm = raw.get("normalize_activations", "none")
    if norm is None or norm is False:
        norm = "none"
    elif norm is True:  # pre-6 boolean
        norm = "expected_average_only_in"

    st = _Tensors(w_path, _read_safetensors(w_path))
    t = {"W_enc": st.take("W_enc", (d_in, m), "[d_in, d_sae]").T, "b_enc": st.take("b_enc", (m,)),
         "W_dec": st.take("W_dec", (m, d_out), "[d_sae, d_out]"), "b_dec": st.take("b_dec", (d_out,))}
    if ours == "jumprelu":
        if st.has("log_threshold") and not st.has("threshold"):
            t["threshold"] = _f(st.take("log_threshold", (m,))).exp()
        else:
            t["threshold"] = st.take("threshold", (m,), "JumpReLU thresholds")
    if skip:
        t["W_skip"] = st.take("W_skip", (d_out, d_in), "[d_out, d_in]")
    if ours == "batchtopk":
        t["batch_threshold"] = st.take("topk_threshold", (), "the BatchTopK inference threshold")
    for key in ("scaling_factor", "finetuning_scaling_factor"):  # older SAELens: decode(f · s)
        if st.has(key):
            t["W_dec"] = _f(t["W_dec"]) * _f(st.take(key, (m,)))[:, None]
    st.finish()

    rescale = _cfg_bool(raw, "rescale_acts_by_decoder_norm", cfg_path, False)
    if rescale and ours not in ("topk", "batchtopk"):
        raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm is only defined for topk SAEs")
    input_norm = "none"
    if norm == "layer_norm":
        if transcoder:
            # SAELens transcoders normalise their input but never undo it on the (differently
            # sized) output; sae_fast's layer_norm undoes it, so the functions would differ
            raise ValueError(f"{cfg_path}: normalize_activations='layer_norm' on a SAELens transcoder normalises the "
                             "input only, which sae_fast's input_norm (normalise, then un-normalise the output) "
                             "cannot express")
        input_norm = "layer_norm"  # SAELens' LN is OpenAI's: eps 1e-5, unbiased std
    elif norm in ("expected_average_only_in", "covariance_whitening"):
        rescale = _fold_saelens_scaler(folder, cfg_path, norm, t, apply_b_dec, skip, transcoder, rescale)
    elif norm != "none":
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} cannot be expressed by sae_fast (it rescales "
                         "each row at run time and cannot be folded into the weights)")
    if rescale:
        _fold_decoder_norms(t)
    cfg = _config(cfg_path, d_in=d_in, num_latents=m, architecture=ours, k=k,
                  d_out=d_out if transcoder else None, skip_connection=skip,
                  apply_b_dec_to_input=apply_b_dec, input_norm=input_norm)
    return cfg, t


def _fold_saelens_scaler(folder, cfg_path, norm, t, apply_b_dec, skip, transcoder, rescale) -> bool:
    """Training checkpoints saved before SAELens folds its activation scaler: the scale factor
    and whitening live in ``activation_scaler.json`` / ``activation_whitening.safetensors``.
    Folded in SAELens' order relative to the decoder-norm rescaling (so the activations match
    what its own final save would give); returns whether that rescaling is still to fold."""
    scaler_path = folder / _SAELENS_SCALER
    if not scaler_path.is_file():
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} needs the activation scaler it was trained "
                         f"with, and {scaler_path} is missing (SAELens folds it into the weights on its final save; "
                         "load that checkpoint, or fold it yourself and set normalize_activations='none')")
    if skip or transcoder:
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} cannot be folded into a transcoder")
    scaler = _read_json(scaler_path)
    s = scaler.get("scaling_factor")
    whitening = folder / _SAELENS_WHITENING
    has_whitening = scaler.get("has_whitening", True) and whitening.is_file()
    if norm == "covariance_whitening" and not has_whitening:
        raise ValueError(f"{cfg_path}: normalize_activations='covariance_whitening' but {whitening} is missing")
    if norm == "expected_average_only_in" and s is None:
        raise ValueError(f"{scaler_path}: missing key 'scaling_factor' (null), needed by "
                         "normalize_activations='expected_average_only_in'")
    # scaling is applied to x first, whitening second: fold the inner (whitening) first. Whitening
    # changes decoder norms non-uniformly, so a rescaled TopK folds its norms before it.
    if has_whitening:
        if rescale:
            _fold_decoder_norms(t)
            rescale = False
        d = t["b_dec"].shape[0]
        wt = _Tensors(whitening, _read_safetensors(whitening))
        _fold_whitening(t, wt.take("mean", (d,)), wt.take("matrix", (d, d)), wt.take("inverse_matrix", (d, d)),
                        bool(apply_b_dec))
        wt.finish()
    if s is not None:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s == 0:
            raise ValueError(f"{scaler_path}: scaling_factor must be a finite non-zero number, got {s!r}")
        _fold_scaling(t, float(s))
        if rescale and "batch_threshold" in t:  # in units of pre·‖W_dec‖, and ‖W_dec‖ just shrank by s
            t["batch_threshold"] = _f(t["batch_threshold"]) / float(s)
    return rescale


_SPARSIFY_DEFAULTS = {"activation": "topk", "expansion_factor": 32, "num_latents": 0, "k": 32,
                      "skip_connection": False, "transcode": False}


def _load_sparsify(folder: Path):
    cfg_path, w_path = folder / "cfg.json", folder / _SPARSIFY_WEIGHTS
    raw = {**_SPARSIFY_DEFAULTS, **_read_json(cfg_path)}
    if raw["activation"] != "topk":
        raise ValueError(f"{cfg_path}: activation {raw['activation']!r} is not supported (sae_fast has topk; "
                         "sparsify's groupmax has no equivalent)")
    d = _cfg_int(raw, "d_in", cfg_path)
    m = _cfg_int(raw, "num_latents", cfg_path) or d * _cfg_int(raw, "expansion_factor", cfg_path)
    k = _cfg_int(raw, "k", cfg_path)
    transcode = _cfg_bool(raw, "transcode", cfg_path, False)
    skip = _cfg_bool(raw, "skip_connection", cfg_path, False)
    st = _Tensors(w_path, _read_safetensors(w_path))
    if st.has("encoder.weight") or not st.has("W_enc"):
        t = {"W_enc": st.take("encoder.weight", (m, d), "[num_latents, d_in]"),
             "b_enc": st.take("encoder.bias", (m,))}
    else:  # older checkpoints: W_enc [d_in, num_latents]
        t = {"W_enc": st.take("W_enc", (d, m), "[d_in, num_latents]").T, "b_enc": st.take("b_enc", (m,))}
    t["W_dec"] = st.take("W_dec", (m, d), "[num_latents, d_in]")
    t["b_dec"] = st.take("b_dec", (d,))
    if skip:
        t["W_skip"] = st.take("W_skip", (d, d))
    st.finish()
    # sparsify subtracts b_dec from the input unless transcoding
    cfg = _config(cfg_path, d_in=d, num_latents=m, architecture="topk", k=k, skip_connection=skip,
                  apply_b_dec_to_input=not transcode)
    return cfg, t


# dictionary_learning dict_class -> architecture
_DL_CLASSES = ("AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder", "AutoEncoder", "AutoEncoderNew")


def _load_dictionary_learning(file: Path):
    sd = _torch_load(file)
    cfg_path = file.parent / "config.json"
    if not cfg_path.is_file() and file.parent.name == "checkpoints":  # trainer_i/checkpoints/ae_{step}.pt
        cfg_path = file.parent.parent / "config.json"
    trainer = {}
    if cfg_path.is_file():
        trainer = _read_json(cfg_path).get("trainer") or {}
        if not isinstance(trainer, dict):
            raise ValueError(f"{cfg_path}: 'trainer' must be an object")
    dict_class = trainer.get("dict_class") or _guess_dict_class(sd, file, cfg_path)
    if dict_class not in _DL_CLASSES:
        raise ValueError(f"{cfg_path}: dict_class {dict_class!r} is not supported (supported: {list(_DL_CLASSES)})")
    st = _Tensors(file, sd)
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        m, d = st.shape_of("encoder.weight", 2)
        t = {"W_enc": st.take("encoder.weight", (m, d)), "b_enc": st.take("encoder.bias", (m,)),
             "W_dec": st.take("decoder.weight", (d, m), "[activation_dim, dict_size]").T,
             "b_dec": st.take("b_dec", (d,))}
        k = _dl_int_buffer(st, "k", file)
        if "k" in trainer and trainer["k"] != k:
            raise ValueError(f"{file}: k buffer is {k} but {cfg_path} says k={trainer['k']}")
        arch = "topk" if dict_class == "AutoEncoderTopK" else "batchtopk"
        if arch == "topk":
            if st.has("threshold"):  # only its non-default use_threshold=True encode reads it
                st.take("threshold", (), "the inference threshold buffer")
        else:
            threshold = st.take("threshold", (), "the BatchTopK inference threshold buffer")
            t["batch_threshold"] = threshold
            if float(threshold) < 0:
                # < 0 means unset in both libraries (a checkpoint saved before threshold_start_step),
                # but there its encode keeps every positive activation where ours keeps the batch top-k
                warnings.warn(f"{file}: this BatchTopKSAE has no inference threshold yet (threshold="
                              f"{float(threshold)}); dictionary_learning's encode would keep every positive "
                              "pre-activation, sae_fast's keeps the batch top-k", stacklevel=3)
        cfg = dict(architecture=arch, k=k, apply_b_dec_to_input=True)
    elif dict_class == "JumpReluAutoEncoder":
        d, m = st.shape_of("W_enc", 2)
        t = {"W_enc": st.take("W_enc", (d, m), "[activation_dim, dict_size]").T, "b_enc": st.take("b_enc", (m,)),
             "W_dec": st.take("W_dec", (m, d)), "b_dec": st.take("b_dec", (d,)),
             "threshold": st.take("threshold", (m,))}
        cfg = dict(architecture="jumprelu", apply_b_dec_to_input=False)  # its apply_b_dec_to_input is False
    elif dict_class == "AutoEncoder":
        m, d = st.shape_of("encoder.weight", 2)
        t = {"W_enc": st.take("encoder.weight", (m, d)), "b_enc": st.take("encoder.bias", (m,)),
             "W_dec": st.take("decoder.weight", (d, m), "[activation_dim, dict_size]").T,
             "b_dec": st.take("bias", (d,), "subtracted from the input, added to the output")}
        cfg = dict(architecture="relu", apply_b_dec_to_input=True)
        # as the library's own AutoEncoder.from_pretrained (normalize_decoder=True): decoder
        # columns to unit norm, the encoder scaled to match; same reconstruction, and feature
        # activations equal to the ones its users see
        if not torch.allclose(t["W_dec"].norm(dim=1), torch.ones((), dtype=t["W_dec"].dtype)):
            _fold_decoder_norms(t)
    else:  # AutoEncoderNew: relu(encoder(x)), decoder with its own bias, no input centring
        m, d = st.shape_of("encoder.weight", 2)
        t = {"W_enc": st.take("encoder.weight", (m, d)), "b_enc": st.take("encoder.bias", (m,)),
             "W_dec": st.take("decoder.weight", (d, m), "[activation_dim, dict_size]").T,
             "b_dec": st.take("decoder.bias", (d,))}
        cfg = dict(architecture="relu", apply_b_dec_to_input=False)
    st.finish()
    for key, got in (("activation_dim", d), ("dict_size", m)):
        if key in trainer and trainer[key] != got:
            raise ValueError(f"{cfg_path}: {key}={trainer[key]} but {file} holds {got}")
    return _config(cfg_path if cfg_path.is_file() else file, d_in=d, num_latents=m, **cfg), t


def _dl_int_buffer(st: _Tensors, key: str, file: Path) -> int:
    if not st.has(key):
        raise ValueError(f"{file}: missing key {key!r}")
    v = st.tensors[key]
    if not isinstance(v, torch.Tensor) or v.numel() != 1 or v.is_floating_point():
        raise ValueError(f"{file}: {key} must be a 0-d integer tensor, got {v!r}")
    st.used.add(key)
    return int(v)


def _guess_dict_class(sd: dict, file: Path, cfg_path: Path) -> str:
    keys = set(sd)
    if {"W_enc", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if "bias" in keys and "encoder.weight" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    raise ValueError(f"{cfg_path}: missing (needed to tell which dictionary_learning class {file} holds: "
                     f"keys {sorted(keys)})")


def _load_gemma_scope(file: Path):
    import numpy as np

    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    except Exception as e:  # zipfile / format errors of several types
        raise ValueError(f"{file}: not a readable .npz file: {e}") from None
    st = _Tensors(file, arrays)
    d, m = st.shape_of("W_enc", 2)
    d_out = st.shape_of("W_dec", 2)[1]
    t = {"W_enc": st.take("W_enc", (d, m), "[d_in, d_sae]").T, "b_enc": st.take("b_enc", (m,)),
         "W_dec": st.take("W_dec", (m, d_out), "[d_sae, d_out]"), "b_dec": st.take("b_dec", (d_out,)),
         "threshold": st.take("threshold", (m,))}
    st.finish()
    cfg = _config(file, d_in=d, num_latents=m, architecture="jumprelu", apply_b_dec_to_input=False,
                  d_out=d_out if d_out != d else None)
    return cfg, t


_OPENAI_IGNORED = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")


def _load_openai(file: Path):
    sd = dict(_torch_load(file))
    activation = sd.pop("activation", "ReLU")
    act_sd = sd.pop("activation_state_dict", {})
    st = _Tensors(file, sd, ignore=_OPENAI_IGNORED)
    m, d = st.shape_of("encoder.weight", 2)
    t = {"W_enc": st.take("encoder.weight", (m, d), "[n_latents, d_model]"),
         "b_enc": st.take("latent_bias", (m,)),
         "W_dec": st.take("decoder.weight", (d, m), "[d_model, n_latents]").T,
         "b_dec": st.take("pre_bias", (d,), "subtracted from the input, added to the output")}
    st.finish()
    if activation == "TopK":
        if not isinstance(act_sd, dict) or "k" not in act_sd:
            raise ValueError(f"{file}: missing key 'activation_state_dict.k' (the TopK activation's k)")
        k = act_sd["k"]
        if isinstance(k, torch.Tensor):
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"{file}: activation_state_dict.k must be an integer, got {k!r}")
        post = act_sd.get("postact_fn", "ReLU")
        if post != "ReLU":
            raise ValueError(f"{file}: activation_state_dict.postact_fn={post!r} is not supported (sae_fast's TopK "
                             "applies ReLU to the kept values)")
        # OpenAI normalises inputs exactly when the activation is TopK (Autoencoder.from_state_dict)
        cfg = _config(file, d_in=d, num_latents=m, architecture="topk", k=k, input_norm="layer_norm")
    elif activation == "ReLU":
        cfg = _config(file, d_in=d, num_latents=m, architecture="relu")
    else:
        raise ValueError(f"{file}: activation {activation!r} is not supported (TopK or ReLU)")
    return cfg, t


_LOADERS = {"saelens": _load_saelens, "sparsify": _load_sparsify, "dictionary_learning": _load_dictionary_learning,
            "gemma_scope": _load_gemma_scope, "openai": _load_openai}


# ---------------------------------------------------------------------------------------------
# exporters


def save(sae, directory: Union[str, Path], format: str) -> Path:
    """``SparseAutoencoder.save(directory, format=...)`` for the formats other than sae_fast."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"save: format must be one of {EXPORT_FORMATS}, got {format!r}")
    if format == "sae_fast":
        return sae.save(directory)
    writer = _save_saelens if format == "saelens" else _save_sparsify
    cfg, tensors, weights_name = writer(sae)
    from safetensors.torch import save_file

    from .sae import _atomic_write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", sae.W_enc.dtype).contiguous() for k, v in tensors.items()}
    _atomic_write(directory / weights_name, lambda p: save_file(tensors, str(p)))
    _atomic_write(directory / "cfg.json", lambda p: p.write_text(json.dumps(cfg, indent=2)))
    return directory


def _dtype_name(sae) -> str:
    return str(sae.W_enc.dtype).removeprefix("torch.")


def _save_saelens(sae):
    c = sae.cfg
    transcoder = c.output_dim != c.d_in or c.skip_connection
    if c.architecture == "topk":
        if transcoder:
            raise ValueError("save(format='saelens'): SAELens has no TopK transcoder or TopK skip connection")
        arch = "topk"
    elif c.architecture == "relu":
        arch = ("skip_transcoder" if c.skip_connection else "transcoder") if transcoder else "standard"
    else:  # jumprelu, and batchtopk with its inference threshold (SAELens saves BatchTopK as JumpReLU)
        if c.architecture == "batchtopk" and float(sae.batch_threshold) < 0:
            raise ValueError("save(format='saelens'): this BatchTopK SAE has no inference threshold yet "
                             "(batch_threshold < 0); SAELens stores BatchTopK as JumpReLU with that threshold")
        arch = ("jumprelu_skip_transcoder" if c.skip_connection else "jumprelu_transcoder") if transcoder \
            else "jumprelu"
    if transcoder and c.input_norm != "none":
        raise ValueError("save(format='saelens'): SAELens transcoders normalise their input without undoing it on the "
                         f"output, but this SAE's input_norm={c.input_norm!r} undoes it")
    if transcoder and c.apply_b_dec_to_input:
        raise ValueError("save(format='saelens'): SAELens transcoders and skip transcoders never subtract b_dec "
                         "from their input, but this SAE does (apply_b_dec_to_input=True)")
    cfg = {"architecture": arch, "d_in": c.d_in, "d_sae": c.num_latents, "dtype": _dtype_name(sae), "device": "cpu",
           "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": c.input_norm,
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": _SAELENS_CFG_VERSION, "exported_by": "sae_fast"}}
    if transcoder:
        cfg["d_out"] = c.output_dim
    if arch == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if c.architecture == "jumprelu":
        tensors["threshold"] = sae.threshold
    elif c.architecture == "batchtopk":
        tensors["threshold"] = sae.batch_threshold.expand(c.num_latents)
    if c.skip_connection:
        tensors["W_skip"] = sae.W_skip
    return cfg, tensors, _SAELENS_WEIGHTS


def _save_sparsify(sae):
    c = sae.cfg
    if c.architecture != "topk":
        raise ValueError(f"save(format='sparsify'): sparsify expresses TopK (and groupmax) SAEs only, "
                         f"not {c.architecture!r}")
    if c.output_dim != c.d_in:
        raise ValueError(f"save(format='sparsify'): sparsify's decoder maps back to d_in={c.d_in}, but this SAE "
                         f"outputs d_out={c.output_dim}")
    if c.input_norm != "none":
        raise ValueError(f"save(format='sparsify'): sparsify has no input normalisation (input_norm={c.input_norm!r})")
    with torch.no_grad():
        unit = bool(torch.allclose(sae.W_dec.float().norm(dim=1), torch.ones(c.num_latents, device=sae.W_dec.device),
                                   atol=1e-3))
    cfg = {"activation": "topk", "expansion_factor": max(c.num_latents // c.d_in, 1), "normalize_decoder": unit,
           "num_latents": c.num_latents, "k": c.k, "multi_topk": False, "skip_connection": c.skip_connection,
           # sparsify subtracts b_dec from the input exactly when it is not transcoding
           "transcode": not c.apply_b_dec_to_input, "d_in": c.d_in}
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if c.skip_connection:
        tensors["W_skip"] = sae.W_skip
    return cfg, tensors, _SPARSIFY_WEIGHTS
