"""Activation sources for the trainer: ``.npy`` and ``.safetensors`` files or folders of them.

``load_activations(path)`` reads one file or every ``*.npy`` / ``*.safetensors`` in a folder
(sorted by name) into one ``[T, d]`` float tensor; a safetensors file holds one tensor, or
one named ``activations``. Streaming shards with bounded RAM is still to come (issue 6): this
loads everything.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _load_one(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        import numpy as np

        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"load_activations: {path} is not a plain .npy array: {e}") from None
        t = torch.from_numpy(np.array(arr))  # a writable copy: this source loads everything
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"load_activations: {path} is not a readable safetensors file: {e}") from None
        if "activations" in tensors:
            t = tensors["activations"]
        elif len(tensors) == 1:
            t = next(iter(tensors.values()))
        else:
            raise ValueError(f"load_activations: {path} holds {sorted(tensors)}; name the tensor 'activations'")
    else:
        raise ValueError(f"load_activations: {path}: expected a .npy or .safetensors file")
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"load_activations: {path} must hold a 2-D float array [tokens, d], got "
                         f"{tuple(t.shape)} {t.dtype}")
    return t


def load_activations(path) -> torch.Tensor:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".safetensors"))
        if not files:
            raise FileNotFoundError(f"load_activations: no .npy or .safetensors files in {path}")
        parts = [_load_one(p) for p in files]
        widths = {p.shape[1] for p in parts}
        if len(widths) != 1:
            raise ValueError(f"load_activations: shards in {path} have different widths {sorted(widths)}")
        return torch.cat([p.float() for p in parts])
    if not path.exists():
        raise FileNotFoundError(f"load_activations: {path} not found")
    return _load_one(path).float()
