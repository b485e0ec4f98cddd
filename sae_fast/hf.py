"""Activations from a Hugging Face causal LM, read with a forward hook on one decoder block.

``layer`` L means the residual stream after decoder block L (0-indexed; TransformerLens's
``blocks.L.hook_resid_post``, ``hidden_states[L + 1]`` in transformers). The text is tokenized
once, cut into windows of ``ctx_len`` tokens, and the first position of every window is
dropped (the first token's residual is an outlier, an attention sink). The forward pass is
stopped right after the hooked block.

* ``LiveActivations``: a trainer source computing activations on the fly, from shuffled
  groups of windows (deterministic in seed and position, so checkpoints resume exactly).
* ``write_activation_shards``: the same activations, in window order, to safetensors shards
  that ``ShardedActivations`` streams (compute once, train many times).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from .data import _BufferedSource, _generator


class _Stop(Exception):
    pass


def decoder_layers(model) -> Sequence[torch.nn.Module]:
    """The list of decoder blocks of common HF causal LMs (Llama/Mistral/Qwen, GPT-2, NeoX)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"{type(model).__name__}: cannot find its decoder blocks (tried model.layers, transformer.h, ...)")


def token_windows(token_ids: Sequence[Sequence[int]], ctx_len: int, separator: int | None) -> torch.Tensor:
    """Documents joined (with ``separator`` between them) and cut into [W, ctx_len] windows."""
    if isinstance(ctx_len, bool) or not isinstance(ctx_len, int) or ctx_len < 1:
        raise ValueError(f"ctx_len must be a positive int, got {ctx_len!r}")
    flat = []
    for ids in token_ids:
        flat.extend(ids)
        if separator is not None:
            flat.append(separator)
    n = len(flat) // ctx_len
    if n == 0:
        raise ValueError(f"the corpus has {len(flat)} tokens, fewer than one window of {ctx_len}")
    return torch.tensor(flat[: n * ctx_len], dtype=torch.long).view(n, ctx_len)


@torch.no_grad()
def layer_activations(model, windows: torch.Tensor, layer: int, batch: int = 8) -> torch.Tensor:
    """[W·(ctx_len - 1), d] float32 residual rows after block ``layer`` (first position dropped)."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer must be in [0, {len(blocks)}), got {layer}")
    captured = []

    def hook(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())
        raise _Stop

    handle = blocks[layer].register_forward_hook(hook)
    device = next(model.parameters()).device
    rows = []
    try:
        for start in range(0, windows.shape[0], batch):
            captured.clear()
            try:
                model(input_ids=windows[start:start + batch].to(device))
            except _Stop:
                pass
            rows.append(captured[0][:, 1:].reshape(-1, captured[0].shape[-1]).float().cpu())
    finally:
        handle.remove()
    return torch.cat(rows)


def tokenize_texts(tokenize: Callable[[str], Sequence[int]], texts: Sequence[str]) -> list:
    return [list(tokenize(t)) for t in texts]


class LiveActivations(_BufferedSource):
    """A trainer source: activations of ``windows_per_buffer`` shuffled windows at a time."""

    def __init__(self, model, windows: torch.Tensor, layer: int, *, seed: int = 0, windows_per_buffer: int = 64,
                 model_batch: int = 8):
        super().__init__(seed)
        self.model, self.windows, self.layer = model, windows, layer
        self.windows_per_buffer, self.model_batch = windows_per_buffer, model_batch
        if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
            raise ValueError(f"LiveActivations: windows must be [W >= 1, ctx_len >= 2] (each window's first position "
                             f"is dropped), got {tuple(windows.shape)}")
        self.width = int(getattr(model.config, "hidden_size", 0)) or layer_activations(model, windows[:1], layer).shape[1]

    def __len__(self):
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    def _num_groups(self) -> int:
        return -(-self.windows.shape[0] // self.windows_per_buffer)

    def _max_buffer_rows(self) -> int:
        return min(self.windows_per_buffer, self.windows.shape[0]) * (self.windows.shape[1] - 1)

    def _group_rows(self) -> torch.Tensor:
        order = torch.randperm(self.windows.shape[0], generator=_generator(self.seed, self.epoch))
        picked = order[self.group * self.windows_per_buffer:(self.group + 1) * self.windows_per_buffer]
        return layer_activations(self.model, self.windows[picked], self.layer, self.model_batch)

    def sample_for_init(self, rows: int = 65536) -> torch.Tensor:
        per_window = self.windows.shape[1] - 1
        return layer_activations(self.model, self.windows[: max(1, rows // per_window)], self.layer,
                                 self.model_batch)[:rows]


def write_activation_shards(model, windows: torch.Tensor, layer: int, out_dir, *, windows_per_shard: int = 256,
                            model_batch: int = 8) -> Path:
    """Activations of every window, in order, as ``out_dir/00000.safetensors`` ... (fp32).
    Shards of an earlier call in ``out_dir`` (numbered files) are removed first, so a folder
    never mixes two computations."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("[0-9][0-9][0-9][0-9][0-9].safetensors"):
        old.unlink()
    for i, start in enumerate(range(0, windows.shape[0], windows_per_shard)):
        rows = layer_activations(model, windows[start:start + windows_per_shard], layer, model_batch)
        tmp = out_dir / f".{i:05d}.tmp"
        save_file({"activations": rows.contiguous()}, str(tmp))
        tmp.replace(out_dir / f"{i:05d}.safetensors")
    return out_dir
