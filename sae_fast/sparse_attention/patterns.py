"""Per-head sparse attention patterns and the per-model config that holds them.

MInference observes that each attention head of a long-context LM keeps one of a few shapes
across inputs, while the exact keys move with the input. So the *kind* of pattern and its
*budget* are chosen offline, once per model (``search.search_patterns``), and the keys are
estimated online from the prompt itself (``estimate``). This module is the offline half: a
``HeadPattern`` per (layer, query head) and a ``SparseAttentionConfig`` that reads and writes
MInference's JSON config format, so configs searched by MInference can be used here and the
other way round.

Kinds and what their two sizes mean (MInference's JSON fields ``vertical_size``,
``slash_size``):

* ``"vertical_slash"`` (MInference ``"vertical_and_slash"``): ``vertical_size`` key columns
  every query sees plus ``slash_size`` diagonals (offsets from the main diagonal), both
  estimated from the last 64 queries.
* ``"a_shape"`` (MInference ``"stream_llm"``): ``vertical_size`` = sink tokens (the first
  keys), ``slash_size`` = local window; static, nothing is estimated. MInference's defaults
  are 128 + 3968.
* ``"block_sparse"``: ``vertical_size`` = number of 64-key blocks kept per 64-query block
  (the diagonal block always among them), chosen from mean-pooled block scores;
  ``slash_size`` is unused.
* ``"dense"`` (our addition, written as ``["dense", 0, 0, score]``): causal dense attention,
  for heads where every sparse candidate loses too much mass.

A budget larger than the sequence is clipped at run time; one that covers the whole
sequence gives dense causal attention.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

__all__ = ["HeadPattern", "SparseAttentionConfig", "PATTERN_KINDS"]

PATTERN_KINDS = ("vertical_slash", "a_shape", "block_sparse", "dense")

# MInference JSON name -> our kind (reading); our kind -> JSON name (writing).
_FROM_JSON = {
    "vertical_and_slash": "vertical_slash",
    "vertical_slash": "vertical_slash",
    "stream_llm": "a_shape",
    "a_shape": "a_shape",
    "A-shape": "a_shape",
    "block_sparse": "block_sparse",
    "dense": "dense",
}
_TO_JSON = {"vertical_slash": "vertical_and_slash", "a_shape": "stream_llm", "block_sparse": "block_sparse",
            "dense": "dense"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class HeadPattern:
    """One head's pattern: ``kind`` (one of ``PATTERN_KINDS``), its two sizes (meaning per kind
    in the module docstring) and ``score``, the share of attention mass the pattern kept in
    the offline search (informative only; 1.0 when not searched)."""

    kind: str
    vertical_size: int = 0
    slash_size: int = 0
    score: float = 1.0

    def __post_init__(self):
        if self.kind not in PATTERN_KINDS:
            raise ValueError(f"HeadPattern: kind must be one of {PATTERN_KINDS}, got {self.kind!r}")
        for name in ("vertical_size", "slash_size"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"HeadPattern({self.kind}): {name} must be an int, got {value!r}")
        if isinstance(self.score, bool) or not isinstance(self.score, (int, float)):
            raise TypeError(f"HeadPattern({self.kind}): score must be a number, got {self.score!r}")
        if isinstance(self.score, float) and not math.isfinite(self.score):
            # MInference's JSON has no NaN/inf: save() would write a file load() refuses
            raise ValueError(f"HeadPattern({self.kind}): score must be finite, got {self.score!r}")
        v, s = self.vertical_size, self.slash_size
        # Every pattern keeps the diagonal, so every query row sees at least itself: a row
        # that sees nothing would silently output zeros.
        if self.kind == "vertical_slash" and (v < 0 or s < 1):
            raise ValueError(f"HeadPattern(vertical_slash): need vertical_size >= 0 and slash_size >= 1 "
                             f"(the main diagonal), got ({v}, {s})")
        if self.kind == "a_shape" and (v < 0 or s < 1):
            raise ValueError(f"HeadPattern(a_shape): need sink (vertical_size) >= 0 and local window "
                             f"(slash_size) >= 1, got ({v}, {s})")
        if self.kind == "block_sparse" and v < 1:
            raise ValueError(f"HeadPattern(block_sparse): need vertical_size (key blocks kept) >= 1, got {v}")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def vertical_slash(cls, vertical_size: int = 1000, slash_size: int = 6096, score: float = 1.0) -> "HeadPattern":
        return cls("vertical_slash", vertical_size, slash_size, score)

    @classmethod
    def a_shape(cls, sink: int = 128, local: int = 3968, score: float = 1.0) -> "HeadPattern":
        return cls("a_shape", sink, local, score)

    @classmethod
    def block_sparse(cls, top_blocks: int, score: float = 1.0) -> "HeadPattern":
        return cls("block_sparse", top_blocks, 0, score)

    @classmethod
    def dense(cls, score: float = 1.0) -> "HeadPattern":
        return cls("dense", 0, 0, score)

    @property
    def sink(self) -> int:
        return self.vertical_size

    @property
    def local(self) -> int:
        return self.slash_size

    @property
    def top_blocks(self) -> int:
        return self.vertical_size

    def with_score(self, score: float) -> "HeadPattern":
        return HeadPattern(self.kind, self.vertical_size, self.slash_size, float(score))

    def to_json(self) -> list:
        return [_TO_JSON[self.kind], self.vertical_size, self.slash_size, float(self.score)]

    @classmethod
    def from_json(cls, entry, where: str = "") -> "HeadPattern":
        """Parse ``[pattern_name, vertical_size, slash_size, search_score]`` (the score may be
        missing). Integral floats (``1000.0``) are accepted as sizes."""
        if not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4):
            raise ValueError(f"{where}: expected [pattern_name, vertical_size, slash_size, search_score], got {entry!r}")
        name = entry[0]
        if not isinstance(name, str) or name not in _FROM_JSON:
            raise ValueError(f"{where}: unknown pattern name {name!r}; known: {sorted(_FROM_JSON)}")
        sizes = []
        for label, x in zip(("vertical_size", "slash_size"), entry[1:3]):
            if isinstance(x, float) and x.is_integer():
                x = int(x)
            if not _is_int(x):
                raise ValueError(f"{where}: {label} must be an integer, got {x!r}")
            sizes.append(x)
        score = entry[3] if len(entry) == 4 else 1.0
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(float(score)):
            raise ValueError(f"{where}: search_score must be a finite number, got {score!r}")
        kind = _FROM_JSON[name]
        if kind == "block_sparse":
            sizes[1] = 0  # unused; MInference writes placeholders such as -1
        if kind == "dense":
            sizes = [0, 0]
        try:
            return cls(kind, sizes[0], sizes[1], float(score))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None


PathLike = Union[str, os.PathLike]


class SparseAttentionConfig:
    """Layer -> query head -> ``HeadPattern`` for one model.

    Build it with a uniform constructor (``vertical_slash``, ``a_shape``, ``block_sparse``,
    ``dense``, ``uniform``), from MInference's JSON (``load`` / ``from_json_list``), or by
    ``search.search_patterns``. Every layer has the same number of heads (the model's query
    heads); ``check_model_shape`` compares that with a model.
    """

    def __init__(self, layers: Sequence[Sequence[HeadPattern]]):
        layers = [list(layer) for layer in layers]
        if not layers:
            raise ValueError("SparseAttentionConfig: needs at least one layer")
        heads = len(layers[0])
        for i, layer in enumerate(layers):
            if len(layer) != heads or heads == 0:
                raise ValueError(f"SparseAttentionConfig: layer {i} has {len(layer)} heads, layer 0 has {heads} "
                                 "(every layer needs one pattern per query head, at least one)")
            for h, p in enumerate(layer):
                if not isinstance(p, HeadPattern):
                    raise TypeError(f"SparseAttentionConfig: layer {i} head {h} is {type(p).__name__}, not HeadPattern")
        self.layers = layers

    # ------------------------------------------------------------------ constructors

    @classmethod
    def uniform(cls, num_layers: int, num_heads: int, pattern: HeadPattern) -> "SparseAttentionConfig":
        for name, n in (("num_layers", num_layers), ("num_heads", num_heads)):
            if not _is_int(n) or n < 1:
                raise ValueError(f"SparseAttentionConfig.uniform: {name} must be a positive int, got {n!r}")
        return cls([[pattern] * num_heads for _ in range(num_layers)])

    @classmethod
    def vertical_slash(cls, num_layers: int, num_heads: int, vertical_size: int = 1000,
                       slash_size: int = 6096) -> "SparseAttentionConfig":
        """Every head vertical-slash with the same budget (MInference's default 1000 / 6096)."""
        return cls.uniform(num_layers, num_heads, HeadPattern.vertical_slash(vertical_size, slash_size))

    @classmethod
    def a_shape(cls, num_layers: int, num_heads: int, sink: int = 128, local: int = 3968) -> "SparseAttentionConfig":
        return cls.uniform(num_layers, num_heads, HeadPattern.a_shape(sink, local))

    @classmethod
    def block_sparse(cls, num_layers: int, num_heads: int, top_blocks: int = 100) -> "SparseAttentionConfig":
        return cls.uniform(num_layers, num_heads, HeadPattern.block_sparse(top_blocks))

    @classmethod
    def dense(cls, num_layers: int, num_heads: int) -> "SparseAttentionConfig":
        return cls.uniform(num_layers, num_heads, HeadPattern.dense())

    @classmethod
    def for_model(cls, model, pattern: HeadPattern) -> "SparseAttentionConfig":
        """Every head of ``model`` (a HF model: ``config.num_hidden_layers``,
        ``config.num_attention_heads``) gets ``pattern``."""
        layers, heads = model_shape(model)
        return cls.uniform(layers, heads, pattern)

    # ------------------------------------------------------------------ properties

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return len(self.layers[0])

    def __getitem__(self, layer: int) -> list:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other) -> bool:
        return isinstance(other, SparseAttentionConfig) and self.layers == other.layers

    def __repr__(self) -> str:
        kinds = {}
        for layer in self.layers:
            for p in layer:
                kinds[p.kind] = kinds.get(p.kind, 0) + 1
        return f"SparseAttentionConfig(layers={self.num_layers}, heads={self.num_heads}, kinds={kinds})"

    def kinds(self) -> set:
        return {p.kind for layer in self.layers for p in layer}

    def check_model_shape(self, num_layers: int, num_heads: int) -> None:
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise ValueError(f"SparseAttentionConfig has {self.num_layers} layers x {self.num_heads} heads, the model "
                             f"has {num_layers} layers x {num_heads} query heads")

    # ------------------------------------------------------------------ JSON

    def to_json_list(self) -> list:
        """MInference's format: one dict per layer, ``{"head": [name, v, s, score]}``."""
        return [{str(h): p.to_json() for h, p in enumerate(layer)} for layer in self.layers]

    @classmethod
    def from_json_list(cls, data, source: str = "config") -> "SparseAttentionConfig":
        """Parse MInference's format. Raises ValueError naming the layer and head of the first
        malformed entry. Every layer must list heads ``"0" .. "H-1"`` exactly once."""
        if not isinstance(data, list) or not data:
            raise ValueError(f"{source}: expected a non-empty JSON list with one object per layer, "
                             f"got {type(data).__name__}")
        layers = []
        for i, layer in enumerate(data):
            if not isinstance(layer, dict):
                raise ValueError(f"{source}: layer {i} must be an object mapping head index to "
                                 f"[pattern, vertical_size, slash_size, score], got {type(layer).__name__}")
            heads, keys = {}, {}
            for key, entry in layer.items():
                if not isinstance(key, str) or not key.isascii() or not key.isdigit():
                    raise ValueError(f"{source}: layer {i}: head keys must be decimal strings, got {key!r}")
                h = int(key)
                if h in keys:  # "1" and "01": one head listed twice, one entry silently lost
                    raise ValueError(f"{source}: layer {i} lists head {h} twice ({keys[h]!r} and {key!r})")
                keys[h] = key
                heads[h] = HeadPattern.from_json(entry, f"{source}: layer {i}, head {key!r}")
            if sorted(heads) != list(range(len(heads))) or not heads:
                raise ValueError(f"{source}: layer {i} must list heads 0..H-1 exactly once, got {sorted(heads)}")
            layers.append([heads[h] for h in range(len(heads))])
        counts = {len(layer) for layer in layers}
        if len(counts) != 1:
            raise ValueError(f"{source}: layers have different head counts {sorted(counts)}")
        return cls(layers)

    def save(self, path: PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json_list()))
        return path

    @classmethod
    def load(cls, path: PathLike) -> "SparseAttentionConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json_list(data, str(path))


def model_shape(model) -> tuple:
    """(num_hidden_layers, num_attention_heads) from a HF model or config."""
    config = getattr(model, "config", model)
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text.num_hidden_layers), int(text.num_attention_heads)
    except AttributeError:
        raise ValueError(f"{type(model).__name__}: its config has no num_hidden_layers / num_attention_heads; "
                         "not a decoder-only transformer this module supports") from None


def iter_patterns(config: SparseAttentionConfig) -> Iterable[tuple]:
    for i, layer in enumerate(config.layers):
        for h, p in enumerate(layer):
            yield i, h, p
