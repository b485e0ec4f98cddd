"""``SparseAutoencoder``: the thin module on top of the sae_fast ops.

Canonical, latent-major parameters: ``W_enc [M, d_in]``, ``b_enc [M]``, ``W_dec [M, d_out]``,
``b_dec [d_out]``, JumpReLU ``threshold [M]`` (trained as ``log_threshold``), optional
``W_skip [d_out, d_in]`` (transcoders). Architectures:

* ``topk``: k largest pre-activations per row, ReLU (``topk_encode``; AuxK with a dead mask);
* ``batchtopk``: k·N largest over the batch in training, the learned scalar ``threshold``
  buffer at inference (``batchtopk_encode``); CSR codes; AuxK in training like topk;
* ``jumprelu``: per-latent thresholds (``jumprelu_encode`` / ``jumprelu_training_forward``);
* ``relu``: ReLU with an L1 penalty (dense activations written by the threshold kernel).

``input_norm="layer_norm"`` (OpenAI's TopK checkpoints, SAELens ``normalize_activations=
"layer_norm"``): each input row is centred and divided by (unbiased std + 1e-5) before
encoding, and the reconstruction is mapped back with that row's std and mean.

The module launches no kernels itself: every path runs through ``sae_fast`` ops, and the
TopK / BatchTopK / JumpReLU training paths never build an ``[N, M]`` tensor. Checkpoints are
``cfg.json`` + ``model.safetensors`` (no pickle); ``from_pretrained`` and ``save(format=...)``
also read and write the other libraries' formats (``sae_fast.formats``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from . import ops

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
INPUT_NORMS = ("none", "layer_norm")
LAYER_NORM_EPS = 1e-5  # OpenAI's (and SAELens') LN: (x - mean) / (std + eps), std unbiased
_CFG, _WEIGHTS = "cfg.json", "model.safetensors"


@dataclasses.dataclass
class SAEConfig:
    d_in: int
    num_latents: int
    architecture: str = "topk"
    k: int = 32
    d_out: Optional[int] = None  # None: d_in (an autoencoder); otherwise a transcoder
    skip_connection: bool = False
    apply_b_dec_to_input: bool = True
    k_aux: int = 0  # AuxK latents (topk, batchtopk in training); 0 disables AuxK
    aux_coeff: float = 1 / 32
    bandwidth: float = 0.05  # JumpReLU straight-through bandwidth
    initial_threshold: float = 0.01  # JumpReLU
    l1_coeff: float = 1e-3  # relu
    l0_coeff: float = 1e-3  # jumprelu (the trainer may schedule it)
    input_norm: str = "none"  # "layer_norm": per-row LN before encoding, undone after decoding

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAEConfig: architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("d_in", "num_latents", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SAEConfig: {name} must be a positive int, got {v!r}")
        if self.architecture in ("topk", "batchtopk") and self.k > self.num_latents:
            raise ValueError(f"SAEConfig: k={self.k} exceeds num_latents={self.num_latents}")
        if isinstance(self.k_aux, bool) or not isinstance(self.k_aux, int) or not 0 <= self.k_aux <= self.num_latents:
            raise ValueError(f"SAEConfig: k_aux must be an int in [0, num_latents={self.num_latents}], got {self.k_aux!r}")
        if self.d_out is not None and (isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out < 1):
            raise ValueError(f"SAEConfig: d_out must be None or a positive int, got {self.d_out!r}")
        if self.d_out is not None and self.d_out != self.d_in and self.apply_b_dec_to_input:
            raise ValueError("SAEConfig: a transcoder (d_out != d_in) cannot subtract b_dec from its input; "
                             "set apply_b_dec_to_input=False")
        if not (self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise ValueError(f"SAEConfig: bandwidth must be > 0, got {self.bandwidth!r}")
        if not (self.initial_threshold > 0 and math.isfinite(self.initial_threshold)):  # stored as log θ
            raise ValueError(f"SAEConfig: initial_threshold must be > 0, got {self.initial_threshold!r}")
        for name in ("aux_coeff", "l1_coeff", "l0_coeff"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"SAEConfig: {name} must be a finite number >= 0, got {v!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"SAEConfig: input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.input_norm == "layer_norm" and self.d_in < 2:
            raise ValueError("SAEConfig: input_norm='layer_norm' needs d_in >= 2 (an unbiased std)")

    @property
    def output_dim(self) -> int:
        return self.d_out or self.d_in


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor
    codes: object  # TopKCodes / BatchTopKCodes / JumpReLUCodes / dense [N, M] (relu); JumpReLU training: the
    # listed entries (near-threshold inactive ones carry value 0)
    fvu: torch.Tensor
    l0: torch.Tensor
    aux_loss: torch.Tensor  # AuxK (topk, batchtopk), L1 (relu), coefficient-free L0 (jumprelu), else 0
    loss: torch.Tensor  # fvu + the architecture's weighted auxiliary term


def fvu(x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: ‖target - x_hat‖² / ‖target - mean(target)‖² (fp32)."""
    t = target.float()
    return (t - x_hat.float()).pow(2).sum() / (t - t.mean(0)).pow(2).sum().clamp_min(1e-30)


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig, *, device=None, dtype: torch.dtype = torch.float32, init: bool = True,
                 backend: Optional[str] = None):
        """``backend``: the ops' backend for every call (None: the package default)."""
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        m, d_in, d_out = cfg.num_latents, cfg.d_in, cfg.output_dim
        kw = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(torch.empty(m, d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(m, **kw))
        self.W_dec = nn.Parameter(torch.empty(m, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **kw)) if cfg.skip_connection else None
        if cfg.architecture == "jumprelu":
            # at least fp32: a 16-bit log θ puts exp(log θ) up to 3 bf16 ulps from the θ it was
            # made from; in fp32, θ is within an fp32 ulp and rounds to the same 16-bit value
            self.log_threshold = nn.Parameter(torch.full((m,), math.log(cfg.initial_threshold), device=device,
                                                         dtype=torch.promote_types(dtype, torch.float32)))
        # BatchTopK inference threshold (a running estimate the trainer updates); < 0: unset. At
        # least fp32: its 0.99-momentum update moves it by 1% of a step, below half a bf16 ulp
        # once the estimate settles, so a 16-bit copy freezes
        self.register_buffer("batch_threshold", torch.tensor(-1.0, device=device,
                                                             dtype=torch.promote_types(dtype, torch.float32)),
                             persistent=True)
        if init:
            self.reset_parameters()

    # the per-latent / running thresholds keep at least fp32 whatever dtype the module is cast to
    _FP32_STATE = ("log_threshold", "batch_threshold")

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.bfloat16()`` cast the weights but keep the thresholds
        in at least fp32, converted from their unrounded values (they are M + 1 numbers; see
        ``__init__`` for why 16 bits is not enough)."""
        before = {n: getattr(self, n).data for n in self._FP32_STATE if getattr(self, n, None) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            t = getattr(self, name)
            want = torch.promote_types(t.dtype, torch.float32)
            if t.dtype == want:
                continue
            fixed = old.to(device=t.device, dtype=want)
            if isinstance(t, nn.Parameter):
                t.data = fixed
                if t.grad is not None:
                    t.grad = t.grad.to(want)
            else:
                self._buffers[name] = fixed
        return self

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Decoder rows: random unit vectors; encoder = decoder transposed (the usual TopK
        initialisation, Gao et al. 2024); biases zero."""
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32, device="cpu")
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec.copy_(w)
            if self.cfg.output_dim == self.cfg.d_in:
                self.W_enc.copy_(w)
            else:
                e = torch.randn(self.W_enc.shape, generator=generator, dtype=torch.float32, device="cpu")
                self.W_enc.copy_(e / e.norm(dim=1, keepdim=True).clamp_min(1e-12))
            self.b_enc.zero_()
            self.b_dec.zero_()

    # ---- parameters in the ops' terms

    @property
    def threshold(self) -> torch.Tensor:
        if self.cfg.architecture != "jumprelu":
            raise AttributeError("threshold: only the jumprelu architecture has per-latent thresholds")
        return self.log_threshold.exp()

    def _centre(self):
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    def _normalise(self, x: torch.Tensor):
        """(input the encoder sees, per-row (mean, std) or None). LN stats in at least fp32,
        like OpenAI's fp32 reference, whatever x's dtype."""
        if self.cfg.input_norm == "none":
            return x, None
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mu = xf.mean(-1, keepdim=True)
        xc = xf - mu
        std = xc.std(-1, keepdim=True)
        return (xc / (std + LAYER_NORM_EPS)).to(x.dtype), (mu, std)

    @staticmethod
    def _denormalise(out: torch.Tensor, stats) -> torch.Tensor:
        if stats is None:
            return out
        mu, std = stats
        return (out.to(mu.dtype) * std + mu).to(out.dtype)

    # ---- encode / decode

    def encode(self, x: torch.Tensor, *, dead_mask: Optional[torch.Tensor] = None):
        """Sparse codes in the ops' formats: TopKCodes (topk), BatchTopKCodes (batchtopk: the
        batch selection in training mode or while no threshold is set, the threshold after),
        JumpReLUCodes (jumprelu), dense [N, M] activations (relu)."""
        return self._encode(self._normalise(x)[0], dead_mask)

    def _encode(self, x: torch.Tensor, dead_mask: Optional[torch.Tensor]):
        arch = self.cfg.architecture
        if arch == "topk":
            k_aux = self.cfg.k_aux if dead_mask is not None else 0
            return ops.topk_encode(x, self.W_enc, self.b_enc, self.cfg.k, b_dec=self._centre(),
                                   dead_mask=dead_mask if k_aux else None, k_aux=k_aux, backend=self.backend)
        if arch == "batchtopk":
            use_threshold = not self.training and float(self.batch_threshold) >= 0
            # AuxK belongs to the batch selection (training mode): the threshold path has none
            k_aux = self.cfg.k_aux if dead_mask is not None and not use_threshold else 0
            return ops.batchtopk_encode(x, self.W_enc, self.b_enc, self.cfg.k, b_dec=self._centre(),
                                        threshold=self.batch_threshold if use_threshold else None,
                                        dead_mask=dead_mask if k_aux else None, k_aux=k_aux, backend=self.backend)
        if arch == "jumprelu":
            return ops.jumprelu_encode(x, self.W_enc, self.b_enc, self.threshold.detach(), b_dec=self._centre(),
                                       backend=self.backend)
        zero = torch.zeros(self.cfg.num_latents, device=x.device, dtype=x.dtype)
        return ops.jumprelu_encode(x, self.W_enc, self.b_enc, zero, b_dec=self._centre(), dense=True,
                                   backend=self.backend)

    def decode(self, codes, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reconstruction from ``encode``'s codes, + the skip connection (which needs x). With
        ``input_norm`` the codes live in normalised space: given x, the output is mapped back
        with x's row mean and std; without x it stays normalised (the codes cannot tell)."""
        stats = self._normalise(x)[1] if x is not None else None
        return self._finish(self._decode(codes), x, stats)

    def _finish(self, out: torch.Tensor, x: Optional[torch.Tensor], stats) -> torch.Tensor:
        """Undo the input norm, then add the skip connection on the raw input (SAELens'
        skip-transcoder order)."""
        out = self._denormalise(out, stats)
        if self.W_skip is not None:
            if x is None:
                raise ValueError("decode: this SAE has a skip connection; pass x")
            out = out + x @ self.W_skip.T
        return out

    def _decode(self, codes) -> torch.Tensor:
        if isinstance(codes, ops.TopKCodes):
            out = ops.sparse_decode(codes.values, codes.indices, self.W_dec, self.b_dec, backend=self.backend)
        elif isinstance(codes, (ops.BatchTopKCodes, ops.JumpReLUCodes)):
            out = ops.sparse_decode_csr(codes.values, codes.indices, codes.row_offsets, self.W_dec, self.b_dec,
                                        backend=self.backend)
        elif isinstance(codes, torch.Tensor):
            out = codes @ self.W_dec + self.b_dec
        else:
            raise TypeError(f"decode: unknown codes {type(codes).__name__}")
        return out

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                dead_mask: Optional[torch.Tensor] = None, batch_select=None) -> SAEOutput:
        """Reconstruction, codes and loss terms. ``y``: the transcoder target (default x);
        ``dead_mask`` [M] bool: latents dead for AuxK (topk; batchtopk in training mode or while
        no threshold is set). ``batch_select`` (batchtopk in training): ``f(sae, x) ->
        BatchTopKCodes`` replacing the selection over this batch, x being the encoder's input
        (data-parallel training selects over the global batch); with a dead mask and k_aux > 0
        it is called as ``f(sae, x, dead_mask=dead_mask)`` and must return the aux entries."""
        target = x if y is None else y
        arch = self.cfg.architecture
        zero = x.new_zeros((), dtype=torch.float32)
        xn, stats = self._normalise(x)
        if arch == "jumprelu" and self.training:
            x_hat, l0, codes = ops.jumprelu_training_forward(
                xn, self.W_enc, self.b_enc, self.threshold.to(x.dtype), self.W_dec, self.b_dec,
                bandwidth=self.cfg.bandwidth, apply_b_dec_to_input=self.cfg.apply_b_dec_to_input,
                return_codes=True, backend=self.backend)
            x_hat = self._finish(x_hat, x, stats)
            f = fvu(x_hat, target)
            return SAEOutput(x_hat, codes, f, l0.float(), l0.float(), f + self.cfg.l0_coeff * l0.float())
        if batch_select is not None and arch == "batchtopk" and self.training:
            codes = (batch_select(self, xn, dead_mask=dead_mask) if dead_mask is not None and self.cfg.k_aux > 0
                     else batch_select(self, xn))
        else:
            codes = self._encode(xn, dead_mask)
        x_hat = self._finish(self._decode(codes), x, stats)
        f = fvu(x_hat, target)
        aux = zero
        if arch in ("topk", "batchtopk"):
            if arch == "topk":
                l0 = (codes.values > 0).sum(1).float().mean()
            else:
                l0 = (codes.row_offsets[-1] / max(x.shape[0], 1)).float()
            if getattr(codes, "aux_values", None) is not None and dead_mask is not None:
                aux = self._auxk_loss(codes, target - x_hat.detach(), int(dead_mask.sum()),
                                      None if stats is None else stats[1])
            weight = self.cfg.aux_coeff
        elif arch == "relu":
            l0 = (codes > 0).sum(1).float().mean()
            aux = (codes.float() * self.W_dec.float().norm(dim=1)).sum(1).mean()
            weight = self.cfg.l1_coeff
        else:
            l0 = (codes.row_offsets[-1] / max(x.shape[0], 1)).float()
            weight = 0.0
        return SAEOutput(x_hat, codes, f, l0, aux, f + weight * aux)

    def _auxk_loss(self, codes, residual, num_dead, row_scale=None):
        """Gao et al. 2024: reconstruct the residual from the top-k_aux dead latents, scaled by
        min(#dead / k_aux, 1); normalised like the FVU. ``row_scale``: the input norm's std, which
        maps the normalised-space decode to the residual's (raw) space."""
        e_hat = ops.sparse_decode(torch.relu(codes.aux_values), codes.aux_indices, self.W_dec, backend=self.backend)
        if row_scale is not None:
            e_hat = e_hat * row_scale.to(e_hat.dtype)
        scale = min(num_dead / max(self.cfg.k_aux, 1), 1.0)
        return scale * fvu(e_hat, residual)

    # ---- decoder geometry

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of ∂W_dec the component along each (unit) decoder row, so a step keeps
        the rows' norms to first order."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    # ---- checkpoints

    def save(self, directory: Union[str, Path], format: str = "sae_fast") -> Path:
        """``cfg.json`` + ``model.safetensors`` (canonical names; JumpReLU as ``threshold``), or
        with ``format="saelens"`` / ``"sparsify"`` the files those libraries load
        (``sae_fast.formats``; a ValueError where the format cannot express this SAE)."""
        if format != "sae_fast":
            from . import formats

            return formats.save(self, directory, format)
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            tensors["W_skip"] = self.W_skip
        if self.cfg.architecture == "jumprelu":
            tensors["threshold"] = self.threshold
        if self.cfg.architecture == "batchtopk":
            tensors["batch_threshold"] = self.batch_threshold
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        _atomic_write(directory / _WEIGHTS, lambda p: save_file(tensors, str(p)))
        cfg = dict(dataclasses.asdict(self.cfg), format="sae_fast", dtype=str(self.W_enc.dtype).removeprefix("torch."))
        _atomic_write(directory / _CFG, lambda p: p.write_text(json.dumps(cfg, indent=2)))
        return directory

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], *, device=None, dtype: torch.dtype = torch.float32,
                        backend: Optional[str] = None) -> "SparseAutoencoder":
        """Load a checkpoint in any supported format (sae_fast, SAELens, sparsify,
        dictionary_learning, Gemma Scope ``params.npz``, OpenAI ``.pt``), detected from the files
        at ``path`` (a folder or a file); layouts and centring conventions are mapped to ours so
        outputs match the original library's. See ``sae_fast.formats``."""
        from . import formats

        return formats.load(cls, path, device=device, dtype=dtype, backend=backend)

    @classmethod
    def load(cls, directory: Union[str, Path], *, device=None, dtype: Optional[torch.dtype] = None,
             backend: Optional[str] = None) -> "SparseAutoencoder":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, weights_path = directory / _CFG, directory / _WEIGHTS
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"SparseAutoencoder.load: {p} not found")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"SparseAutoencoder.load: {cfg_path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != "sae_fast":
            raise ValueError(f"SparseAutoencoder.load: {cfg_path} is not a sae_fast config (no \"format\": \"sae_fast\")")
        fields = {f.name for f in dataclasses.fields(SAEConfig)}
        unknown = sorted(set(raw) - fields - {"format", "dtype"})
        if unknown:
            raise ValueError(f"SparseAutoencoder.load: {cfg_path} has unknown fields {unknown}")
        try:
            cfg = SAEConfig(**{k: v for k, v in raw.items() if k in fields})
        except (TypeError, ValueError) as e:
            raise ValueError(f"SparseAutoencoder.load: {cfg_path}: {e}") from None
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"SparseAutoencoder.load: {weights_path} is not a readable safetensors file: {e}") from None
        if dtype is None:
            name = raw.get("dtype", "float32")
            dtype = getattr(torch, name, None) if isinstance(name, str) else None
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"SparseAutoencoder.load: {cfg_path}: dtype {name!r} is not a torch floating-point "
                                 "dtype name (e.g. \"float32\", \"bfloat16\")")
        sae = cls(cfg, device=device, dtype=dtype, init=False, backend=backend)
        m, d_in, d_out = cfg.num_latents, cfg.d_in, cfg.output_dim
        want = {"W_enc": (m, d_in), "b_enc": (m,), "W_dec": (m, d_out), "b_dec": (d_out,)}
        if cfg.skip_connection:
            want["W_skip"] = (d_out, d_in)
        if cfg.architecture == "jumprelu":
            want["threshold"] = (m,)
        if cfg.architecture == "batchtopk":
            want["batch_threshold"] = ()
        missing = sorted(set(want) - set(tensors))
        extra = sorted(set(tensors) - set(want))
        if missing or extra:
            raise ValueError(f"SparseAutoencoder.load: {weights_path}: missing keys {missing}, unexpected keys {extra}")
        with torch.no_grad():
            for key, shape in want.items():
                t = tensors[key]
                if tuple(t.shape) != shape:
                    raise ValueError(f"SparseAutoencoder.load: {weights_path}: {key} has shape {tuple(t.shape)}, "
                                     f"cfg.json implies {shape}")
                if key == "threshold":
                    sae.log_threshold.copy_(t.double().clamp_min(1e-30).log())
                else:
                    getattr(sae, key).copy_(t)
        return sae


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
