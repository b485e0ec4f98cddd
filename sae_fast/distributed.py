"""Data-parallel SAE training on ``torch.distributed`` (``torchrun``, NCCL on GPUs, gloo on CPU).

What it computes, and why it is built this way:

* **One optimisation, N processes.** ``TrainConfig.batch_size`` is the *global* batch. Every
  rank advances the same deterministic data source (``sae_fast.data``) by the whole global
  batch and keeps its contiguous slice ``[r·B/N, (r+1)·B/N)``, so the data position is the same
  on every rank (checkpoints need one position, and a run can resume with another world size)
  and an N-rank run makes the same steps as a 1-rank run with the same global batch and seed, up
  to float reduction order (tested).
* **The loss is a sum of shares, not a mean of per-rank losses.** The FVU divides by the
  variance of the *global* batch, which no rank sees. Each rank's FVU term (and AuxK's, which is
  normalised the same way) is multiplied by the data-only constant ``D_local / D_global``
  (the variance sums, combined across ranks with Chan's parallel formula from one small
  all-gather), and per-row means (L0, L1) by ``n_local / N``. The shares add up to the global
  loss, so gradients are **summed** across ranks (DDP averages instead: it would need its
  per-rank losses to be means over equal rows, which the FVU is not).
* **Gradients: our own bucketed all-reduce rather than DDP.** The SAE's custom autograd ops
  produce ordinary ``.grad`` tensors, and the trainer edits them after the reduction (decoder
  gradient projection) and edits weights after the step (unit-norm decoder rows), which DDP
  does not know about; DDP would also re-broadcast the BatchTopK threshold buffer every
  forward. Here gradients are reduced once after ``backward``, large tensors in place and
  small ones packed into flat buffers of ``bucket_mb`` MB, so a step costs a handful of
  collectives, not one per parameter. Every rank then applies the same reduced gradient
  with the same Adam state, so parameters stay bitwise identical (``parameters_in_sync``).
* **Dead latents and fired counts** are integer counts all-reduced per step: exact, so AuxK
  sees the same dead mask on every rank and the same one a 1-rank run would.
* **BatchTopK selects over the global batch** by default (``DataParallel(batchtopk="global")``),
  so it too is a 1-rank run: each rank encodes with ``k·world`` per row (its local top
  ``k·B`` entries, B the global batch, which contain its part of the global top ``k·B``), the
  candidate values (``k·B`` per rank, values only) are all-gathered, the ``k·B``-th largest
  is the cut (ties at the cut: global row-major order, as the op), and each rank keeps its
  entries above it — one extra all-gather, no second encode, no ``[N, M]`` tensor.
  ``batchtopk="local"`` keeps the top ``k·n_local`` of each rank's own rows instead (what
  sparsify and dictionary_learning do under DDP: no collective, a smaller selection, but a
  per-micro-batch selection that differs from a 1-rank run's). Either way the running
  inference threshold is updated from the smallest value kept on *any* rank (an all-reduce
  MIN), the rule a single process applies to its batch, so it is identical on every rank.
* **NaN guard**: the per-rank loss terms and finiteness flags are all-gathered before
  ``backward``; if any rank's loss is not finite, every rank raises ``NonFiniteLossError``
  (naming the ranks) at the same point, before the weights change, so nobody hangs in a
  collective.
* **Rank 0 writes** metrics, plots and checkpoints (atomically, as single-process runs do);
  the others wait at a barrier. Every rank holds the whole state, so one checkpoint serves
  all: ``resume`` loads it on every rank (a shared filesystem is assumed) and the data
  position is global.

Costs and limits: every rank reads the whole global batch from the source and keeps its slice
(``ShardedActivations``: each rank loads each shuffle buffer; on one node the page cache serves
the files once). The gradient all-reduce runs after ``backward``, not overlapped with it.
Global BatchTopK all-gathers ``k·B`` values per rank (world 8, k 64, B 16384: 8M values, 32 MB
fp32, a step) and its encoder's backward walks ``world`` times more entries than it keeps.
An exception other than the NaN guard on one rank leaves the others in their next collective
until ``torchrun`` stops the group (or ``timeout_s`` passes).

**Latent (model) parallel**, ``LatentParallelTopK``: for dictionaries too large for one
device, each rank holds a contiguous shard of the latents and the same batch; the global top-k
is chosen from the ranks' local candidates (an all-gather of ``N·k`` values and ids, never an
``[N, M]`` tensor) and the partial reconstructions are summed by a differentiable all-reduce.
Forward, backward and a training step (projection, Adam, unit-norm rows) equal one SAE's
(tested); ``to_sae()`` gathers the whole SAE. It is a building block for a user's loop (TopK
only, no AuxK), not yet wired into ``Trainer`` (dead-latent tracking, sharded checkpoints).

Nothing here runs at import time; ``init_from_env`` is what ``sae-fast train`` calls under
``torchrun``. From Python::

    torch.distributed.init_process_group("nccl")      # or init_from_env()
    trainer = Trainer(sae, cfg, data_parallel=DataParallel())
    trainer.fit(source)
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
from typing import Iterable, Optional

import torch

from .sae import SparseAutoencoder

__all__ = ["DataParallel", "DistEnv", "LatentParallelTopK", "RankSlicedSource", "init_from_env", "shard_bounds",
           "teardown"]


def _dist():
    import torch.distributed as dist

    return dist


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: str
    backend: str
    owns_group: bool  # init_from_env created the process group (teardown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"distributed: environment variable {name}={value!r} is not an int") from None


def init_from_env(device: Optional[str] = None, *, timeout_s: float = 1800.0) -> Optional[DistEnv]:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``); None when those variables are absent (a plain process).

    ``device``: None picks ``cuda:LOCAL_RANK`` with NCCL when CUDA is available, else the CPU
    with gloo; ``"cpu"`` forces gloo on the CPU; ``"cuda"`` means ``cuda:LOCAL_RANK``. A process
    group that already exists is reused (and left alone by ``teardown``)."""
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if world is None and rank is None:
        return None
    if world is None or rank is None:
        raise ValueError("distributed: RANK and WORLD_SIZE must both be set (as torchrun does), "
                         f"got RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}")
    local_rank = _env_int("LOCAL_RANK") or 0
    if not 0 <= rank < world:
        raise ValueError(f"distributed: RANK={rank} is outside WORLD_SIZE={world}")
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"distributed: device {device!r} asked for, but CUDA is not available")
        dev = device if device is not None and ":" in str(device) else f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(dev))
        backend = "nccl"
    else:
        dev, backend = "cpu", "gloo"
    dist = _dist()
    owns = not dist.is_initialized()
    if owns:
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "nccl":
            kwargs["device_id"] = torch.device(dev)
        dist.init_process_group(**kwargs)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                   backend=dist.get_backend(), owns_group=owns)


def teardown(env: Optional[DistEnv], *, wait_for_all: bool = False) -> None:
    """Destroy the process group ``init_from_env`` created (no-op for None or a reused group).

    ``wait_for_all`` (for a rank that finished normally; every rank must then call it): a
    barrier first, so that no rank tears down while another still works (rank 0 saving, say).
    Garbage is collected before the group is destroyed so that no tensor or work handle keeps
    gloo's threads alive into interpreter shutdown: ranks that left early were seen to abort
    there ("terminate called without an active exception", SIGABRT) about once in 50 runs."""
    dist = _dist()
    if env is not None and env.owns_group and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


class RankSlicedSource:
    """A data source as seen by one rank: ``next_batch(global_batch)`` advances the wrapped
    source by the whole global batch and returns this rank's contiguous slice. ``state`` /
    ``load_state`` / ``sample_for_init`` / ``len`` are the wrapped source's (global) ones."""

    def __init__(self, source, rank: int, world_size: int):
        self.source, self.rank, self.world_size = source, rank, world_size

    def __len__(self):
        return len(self.source)

    @property
    def width(self):
        return self.source.width

    def next_batch(self, batch_size: int):
        local = local_batch_size(batch_size, self.world_size)
        x, y = self.source.next_batch(batch_size)
        lo, hi = self.rank * local, (self.rank + 1) * local
        return x[lo:hi], None if y is None else y[lo:hi]

    def sample_for_init(self, *args, **kwargs):
        return self.source.sample_for_init(*args, **kwargs)

    def state(self) -> dict:
        return self.source.state()

    def load_state(self, state: dict) -> None:
        self.source.load_state(state)


def local_batch_size(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        nearest = (global_batch // world_size + 1) * world_size
        raise ValueError(f"distributed: the global batch_size {global_batch} is not divisible by the world size "
                         f"{world_size}; use a multiple of {world_size} (e.g. {nearest})")
    return global_batch // world_size


def _aux_weight(trainer) -> float:
    """The weight of ``out.aux_loss`` in the trainer's loss (mirrors ``Trainer.train_step`` and
    ``SparseAutoencoder.forward``)."""
    scfg, c = trainer.sae.cfg, trainer.cfg
    if scfg.architecture in ("topk", "batchtopk"):  # AuxK (zero for batchtopk with no dead latents)
        return scfg.aux_coeff
    if scfg.architecture == "relu":
        return scfg.l1_coeff
    if scfg.architecture == "jumprelu":
        return scfg.l0_coeff * (min(1.0, trainer.step / c.l0_warmup_steps) if c.l0_warmup_steps else 1.0)
    return 0.0


class DataParallel:
    """The collectives a data-parallel ``Trainer`` needs (pass it as ``Trainer(...,
    data_parallel=DataParallel())``). Needs an initialised default process group (or
    ``group``). ``bucket_mb``: the size of the flat buffers small gradients are packed into for
    the all-reduce; a gradient at least this large is reduced in place on its own.
    ``batchtopk``: "global" (select the top k·B over the global batch: a 1-rank run) or "local"
    (the top k·n_local of each rank's rows), see the module docstring."""

    def __init__(self, group=None, *, bucket_mb: float = 25.0, batchtopk: str = "global"):
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallel: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group (or sae_fast.distributed.init_from_env) first")
        if not bucket_mb > 0:
            raise ValueError(f"DataParallel: bucket_mb must be > 0, got {bucket_mb!r}")
        if batchtopk not in ("global", "local"):
            raise ValueError(f"DataParallel: batchtopk must be 'global' or 'local', got {batchtopk!r}")
        self.batchtopk = batchtopk
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bucket_bytes = int(bucket_mb * 2**20)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- plumbing

    def barrier(self) -> None:
        _dist().barrier(group=self.group)

    def _src(self) -> int:
        """Rank 0 of the group, as a global rank (what broadcast wants)."""
        dist = _dist()
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Every parameter and buffer from rank 0 (runs start from one set of weights whatever
        each rank's RNG did)."""
        for t in list(module.parameters()) + list(module.buffers()):
            self.broadcast_(t)

    @torch.no_grad()
    def broadcast_(self, t: torch.Tensor) -> None:
        buf = t.data if t.is_contiguous() else t.data.contiguous()
        _dist().broadcast(buf, src=self._src(), group=self.group)
        if buf is not t.data:
            t.data.copy_(buf)

    def _gather(self, v: torch.Tensor) -> torch.Tensor:
        """[world, *v.shape]: every rank's ``v`` in rank order."""
        out = [torch.empty_like(v) for _ in range(self.world_size)]
        _dist().all_gather(out, v.contiguous(), group=self.group)
        return torch.stack(out)

    def local_batch(self, global_batch: int) -> int:
        """Rows per rank; a ValueError when the global batch does not split evenly."""
        return local_batch_size(global_batch, self.world_size)

    def shard_source(self, source, global_batch: int) -> RankSlicedSource:
        self.local_batch(global_batch)
        return RankSlicedSource(source, self.rank, self.world_size)

    # ---- the loss: this rank's share of the global one

    def _variance_sums(self, parts: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each [n, d] tensor: (local Σ‖row - local mean‖², global Σ‖row - global mean‖²).
        The local sums use ``sae.fvu``'s exact formula; the global ones combine every rank's
        (n, mean, M2) with Chan's formula (fp64, no cancellation) from one all-gather."""
        packed, local = [], []
        for p in parts:
            t = p.float()
            mean = t.mean(0)
            m2 = (t - mean).pow(2).sum()
            local.append(m2.clamp_min(1e-30))
            packed.append(torch.cat([t.new_tensor([t.shape[0]]), m2.reshape(1), mean]).double())
        gathered = self._gather(torch.cat(packed))
        out, at = [], 0
        for p, m2_local in zip(parts, local):
            d = p.shape[1]
            block = gathered[:, at:at + 2 + d]
            at += 2 + d
            n, m2, means = block[:, 0], block[:, 1], block[:, 2:]
            mean = (n[:, None] * means).sum(0) / n.sum()
            total = m2.sum() + (n * (means - mean).pow(2).sum(1)).sum()
            out.append((m2_local, total.clamp_min(1e-30)))
        return out

    def share_loss(self, trainer, out, x: torch.Tensor, y: Optional[torch.Tensor]):
        """(this rank's share of the global loss, the global batch's metrics). The shares sum to
        the loss a single process computes on the global batch. Raises ``NonFiniteLossError`` on
        every rank when any rank's loss is not finite (collective: all ranks must call it)."""
        from .training import NonFiniteLossError

        sae = trainer.sae
        target = x if y is None else y
        n_local = x.shape[0]
        n_global = n_local * self.world_size
        parts = [target]
        auxk = sae.cfg.architecture in ("topk", "batchtopk") and getattr(out.codes, "aux_values", None) is not None
        if auxk:  # SparseAutoencoder._auxk_loss normalises by the residual's variance
            parts.append(target - out.x_hat.detach())
        sums = self._variance_sums(parts)
        (d_loc, d_glob) = sums[0]
        fvu_share = out.fvu * (d_loc.double() / d_glob).to(out.fvu.dtype)
        if auxk:
            a_loc, a_glob = sums[1]
            aux_share = out.aux_loss * (a_loc.double() / a_glob).to(out.aux_loss.dtype)
        else:  # per-row means (L1, L0) or zero
            aux_share = out.aux_loss * (n_local / n_global)
        weight = _aux_weight(trainer)
        loss = fvu_share + weight * aux_share
        l0_share = out.l0.float() * (n_local / n_global)
        local_ok = torch.isfinite(out.fvu) & torch.isfinite(out.aux_loss)
        row = torch.stack([loss.detach().float(), fvu_share.detach().float(), aux_share.detach().float(),
                           l0_share.detach(), local_ok.float()])
        g = self._gather(row.double()).cpu()
        totals = g[:, :4].sum(0)
        bad = [r for r in range(self.world_size) if g[r, 4] < 0.5]
        if bad or not bool(torch.isfinite(totals[0])):
            where = f"non-finite on rank(s) {bad}" if bad else "non-finite after the cross-rank reduction"
            raise NonFiniteLossError(
                f"step {trainer.step}: loss is {totals[0].item()} (fvu {totals[1].item()}), {where}; "
                f"training stopped on all {self.world_size} ranks before this step changed the weights")
        metrics = dict(loss=totals[0].item(), fvu=totals[1].item(), aux=totals[2].item(), l0=totals[3].item())
        return loss, metrics

    def global_batchtopk(self, sae, x: torch.Tensor, dead_mask: Optional[torch.Tensor] = None):
        """BatchTopK codes for this rank's rows under the selection of the global batch (the
        ``batch_select`` of ``SparseAutoencoder.forward``). With ``dead_mask`` and
        ``cfg.k_aux`` > 0 the AuxK entries too: they are per row, so the local encode's are the
        global ones. Collective."""
        from . import ops

        cfg, world, n = sae.cfg, self.world_size, x.shape[0]
        wide_k = min(cfg.k * world, cfg.num_latents)
        k_aux = cfg.k_aux if dead_mask is not None else 0
        wide = ops.batchtopk_encode(x, sae.W_enc, sae.b_enc, wide_k, b_dec=sae._centre(),
                                    dead_mask=dead_mask if k_aux else None, k_aux=k_aux, backend=sae.backend)
        budget, cap = cfg.k * n * world, wide_k * n
        # Ranked as the op ranks them: NaN above every number, so a rank's NaN rows keep their
        # NaN codes (the loss shows them) instead of a NaN cut emptying every row on every rank.
        vals = wide.values.detach()  # > 0 or NaN, CSR order = row-major
        rows = torch.repeat_interleave(torch.arange(n, device=x.device), wide.row_offsets.diff())
        nan = torch.isnan(vals)
        ranked = vals.masked_fill(nan, float("inf"))
        # A row offers at most min(M, 2k) NaN candidates, as the op's first candidate list does
        # on one process, so a NaN row takes the same share of the budget as it would there.
        nan_seen = nan.long().cumsum(0)
        nan_before_row = torch.cat([nan_seen.new_zeros(1), nan_seen])[wide.row_offsets[:-1].long()]
        ranked[nan & (nan_seen - nan_before_row[rows] > min(cfg.num_latents, 2 * math.ceil(cfg.k)))] = float("-inf")
        padded = vals.new_full((cap,), float("-inf"))
        padded[: vals.numel()] = ranked
        every = self._gather(padded)  # [world, cap]
        flat = every.reshape(-1)
        if budget < flat.numel():
            cut = flat.topk(budget).values[-1]
        else:
            cut = flat.new_tensor(float("-inf"))
        keep = ranked > cut
        if bool(cut > float("-inf")):  # ties at the cut: the first ones in global row-major order
            need = budget - int((flat > cut).sum())
            ties = (every == cut).sum(1)
            mine = max(0, min(need - int(ties[: self.rank].sum()), int(ties[self.rank])))
            tied = ranked == cut
            keep |= tied & (tied.cumsum(0) <= mine)
        counts = torch.bincount(rows[keep], minlength=n)
        row_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(wide.row_offsets.dtype)
        # The threshold is the smallest kept number over the global batch (NaN when every kept
        # entry is NaN, 0 when nothing is kept), as the op's.
        kept = flat[(flat > cut) | (flat == cut)] if bool(cut > float("-inf")) else flat[flat > float("-inf")]
        finite = kept[torch.isfinite(kept)]
        smallest = (finite.min() if finite.numel() else
                    flat.new_tensor(float("nan")) if kept.numel() else flat.new_zeros(()))
        return ops.BatchTopKCodes(wide.values[keep], wide.indices[keep], row_offsets, smallest.reshape(()),
                                  wide.aux_values, wide.aux_indices)

    # ---- gradients and per-step state

    @torch.no_grad()
    def all_reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient across ranks. A parameter whose gradient is None on
        some ranks gets zeros there (and keeps None where it is None on all, so Adam skips it as
        a single process would). Large gradients are reduced in place; the rest in flat
        buffers of at most ``bucket_bytes``."""
        dist = _dist()
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        dist.all_reduce(present, group=self.group)
        grads = []
        for p, n in zip(params, present.tolist()):
            if n == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket: list[torch.Tensor] = []
        size = 0

        def flush():
            nonlocal bucket, size
            if bucket:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, group=self.group)
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
            bucket, size = [], 0

        for g in grads:
            nbytes = g.numel() * g.element_size()
            if nbytes >= self.bucket_bytes and g.is_contiguous():
                dist.all_reduce(g, group=self.group)
                continue
            if bucket and (g.dtype != bucket[0].dtype or size + nbytes > self.bucket_bytes):
                flush()
            bucket.append(g)
            size += nbytes
        flush()

    @torch.no_grad()
    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """The minimum over ranks (the BatchTopK threshold: the smallest value kept anywhere)."""
        t = t.detach().clone().reshape(1)
        _dist().all_reduce(t, op=_dist().ReduceOp.MIN, group=self.group)
        return t.reshape(())

    @torch.no_grad()
    def update_dead_latents(self, trainer, fired: torch.Tensor, n_local: int) -> int:
        """Sum the rank's per-latent firing counts over ranks (int64, exact); update the
        trainer's window counters as one process seeing the global batch would. Returns the
        global number of rows."""
        # int32 halves the traffic (M counts a step); a step's count is at most the global batch
        counts = torch.bincount(fired, minlength=trainer.fired_count.shape[0]).to(torch.int32)
        _dist().all_reduce(counts, group=self.group)
        n = n_local * self.world_size
        trainer.tokens_since_fired += n
        trainer.tokens_since_fired[counts > 0] = 0
        trainer.fired_count += counts
        return n

    @torch.no_grad()
    def parameters_in_sync(self, module: torch.nn.Module) -> bool:
        """True when every parameter and buffer is bitwise the same on all ranks (a position-
        weighted checksum of the raw bits, compared across ranks). Collective."""
        sums = []
        for t in list(module.parameters()) + list(module.buffers()):
            flat = t.detach().reshape(-1)
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
            raw = flat.contiguous().view(bits).to(torch.int64)
            weights = torch.arange(raw.numel(), device=raw.device, dtype=torch.int64) % 1_000_003 + 1
            sums.append(torch.stack([(raw * weights).sum(), raw.sum()]))
        mine = torch.stack(sums).reshape(-1) if sums else torch.zeros(1, dtype=torch.int64, device="cpu")
        g = self._gather(mine)
        return bool((g == g[0]).all())


# ---- latent (model) parallel: the dictionary split over ranks

def shard_bounds(num_latents: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` latent ranges, one per rank, sizes differing by at most one."""
    base, extra = divmod(num_latents, world_size)
    bounds, lo = [], 0
    for r in range(world_size):
        hi = lo + base + (1 if r < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of every rank's ``partial``. Backward: the incoming gradient unchanged.
    Every rank computes the same loss from the sum (the batch is replicated), so that gradient
    already is d(loss)/d(partial) on every rank. (``torch.distributed.nn.functional.all_reduce``,
    deprecated in recent torch (2.14 warns), sums the gradient over ranks instead — right when the ranks'
    losses add up to the objective, ``world`` times too large for a replicated loss — and
    spends a collective in backward to do it.)"""

    @staticmethod
    def forward(ctx, partial, group):
        out = partial.contiguous().clone()
        _dist().all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class LatentParallelTopK(torch.nn.Module):
    """A TopK SAE whose dictionary is split over the ranks of a process group, for dictionaries
    too large for one device. Rank r holds the contiguous latents ``[lo, hi)``
    (``shard_bounds``): rows of ``W_enc``, ``b_enc`` and ``W_dec``; ``b_dec`` is replicated.
    Every rank sees the same batch ``x``.

    ``forward(x)``: each rank encodes against its shard (``topk_encode``: its local top-k, no
    ``[N, M]`` tensor), the local candidates (values and global ids, ``N·k`` each) are
    all-gathered and the global top-k per row chosen (ties: the smaller id first, as the op);
    each rank decodes the chosen entries it owns (``sparse_decode``) and the partial
    reconstructions are summed over ranks by a differentiable all-reduce (``_SumOverRanks``).
    The values equal a single SAE's top-k then ReLU; where fewer than k
    pre-activations are positive, the ids of the zero-valued entries may differ from a single
    SAE's (they are chosen by id, not by negative pre-activation), which changes nothing else.

    Backward assumes every rank computes the same loss from ``x_hat`` (the batch is
    replicated), so the all-reduce passes that loss's gradient straight to each rank's partial
    (no collective in backward); gradients reach this rank's values, ``W_dec`` rows and,
    through ``topk_encode``'s backward, its ``W_enc`` / ``b_enc`` rows. Sharded parameters then hold their
    exact gradients; call ``reduce_replicated_gradients()`` after ``backward`` to sum ``b_dec``'s
    per-rank parts (its direct term flows through rank 0, its encoder term through every
    shard). A gradient to ``x`` would need the same sum. TopK only, no AuxK, no input norm,
    no skip connection (ValueError).

    A training step: ``forward``, loss, ``backward``, ``reduce_replicated_gradients()``,
    ``remove_gradient_parallel_to_decoder_directions()``, the optimizer's step on this rank's
    parameters, ``set_decoder_norm_to_unit_norm()`` (both row-wise, so shard-local: the same
    methods as ``SparseAutoencoder``'s); ``to_sae()`` gathers the whole SAE (to save it)."""

    # row-wise on W_dec only: on a shard they do exactly what they do on the whole SAE
    set_decoder_norm_to_unit_norm = SparseAutoencoder.set_decoder_norm_to_unit_norm
    remove_gradient_parallel_to_decoder_directions = SparseAutoencoder.remove_gradient_parallel_to_decoder_directions

    def __init__(self, cfg, group=None, *, device=None, dtype: torch.dtype = torch.float32,
                 backend: Optional[str] = None):
        super().__init__()
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("LatentParallelTopK: torch.distributed is not initialised")
        if cfg.architecture != "topk":
            raise ValueError(f"LatentParallelTopK: only the topk architecture is sharded, got {cfg.architecture!r}")
        if cfg.input_norm != "none" or cfg.skip_connection:
            raise ValueError("LatentParallelTopK: input_norm and skip_connection are not supported")
        self.cfg, self.group, self.backend = cfg, group, backend
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.bounds = shard_bounds(cfg.num_latents, self.world_size)
        smallest = min(hi - lo for lo, hi in self.bounds)
        if smallest < cfg.k:
            raise ValueError(f"LatentParallelTopK: k={cfg.k} exceeds the smallest shard ({smallest} latents of "
                             f"{cfg.num_latents} over {self.world_size} ranks); every rank must offer k candidates")
        self.lo, self.hi = self.bounds[self.rank]
        m, kw = self.hi - self.lo, dict(device=device, dtype=dtype)
        self.W_enc = torch.nn.Parameter(torch.zeros(m, cfg.d_in, **kw))
        self.b_enc = torch.nn.Parameter(torch.zeros(m, **kw))
        self.W_dec = torch.nn.Parameter(torch.zeros(m, cfg.output_dim, **kw))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.output_dim, **kw))

    @classmethod
    def from_sae(cls, sae, group=None) -> "LatentParallelTopK":
        """This rank's shard of a full ``SparseAutoencoder`` (the same weights on every rank)."""
        out = cls(sae.cfg, group, device=sae.W_enc.device, dtype=sae.W_enc.dtype, backend=sae.backend)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec"):
                getattr(out, name).copy_(getattr(sae, name)[out.lo:out.hi])
            out.b_dec.copy_(sae.b_dec)
        return out

    def forward(self, x: torch.Tensor):
        """(x_hat [N, d_out], values [N, k], global latent ids [N, k]) — values descending."""
        from . import ops

        k = self.cfg.k
        centre = self.b_dec if self.cfg.apply_b_dec_to_input else None
        local = ops.topk_encode(x, self.W_enc, self.b_enc, k, b_dec=centre, backend=self.backend)
        ids = local.indices.to(torch.int64) + self.lo
        cand_v = self._gather_cols(local.values.detach())  # [N, world·k], rank-major
        cand_i = self._gather_cols(ids)
        by_id = cand_i.argsort(dim=1)  # ids are distinct within a row: ties broken by the smaller id
        order = cand_v.gather(1, by_id).sort(dim=1, descending=True, stable=True).indices[:, :k]
        pos = by_id.gather(1, order)  # chosen positions in the candidate list
        values, indices = cand_v.gather(1, pos), cand_i.gather(1, pos)
        mine = (pos // k) == self.rank
        slot = (pos - self.rank * k).clamp(0, k - 1)  # others' entries add 0 to some slot
        keep = torch.zeros(local.values.shape, dtype=torch.int32, device=x.device).scatter_add_(1, slot, mine.int()) > 0
        partial = ops.sparse_decode(local.values * keep, local.indices, self.W_dec,
                                    self.b_dec if self.rank == 0 else None, backend=self.backend)
        x_hat = _SumOverRanks.apply(partial, self.group)
        return x_hat, values, indices

    @torch.no_grad()
    def to_sae(self) -> SparseAutoencoder:
        """The whole SAE, assembled from every rank's shard, on every rank. Collective."""
        sae = SparseAutoencoder(self.cfg, device=self.W_enc.device, dtype=self.W_enc.dtype, init=False,
                                backend=self.backend)
        rows = max(hi - lo for lo, hi in self.bounds)
        for name in ("W_enc", "b_enc", "W_dec"):
            mine = getattr(self, name).detach()
            padded = mine.new_zeros((rows,) + mine.shape[1:])
            padded[: mine.shape[0]] = mine
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            _dist().all_gather(parts, padded, group=self.group)
            getattr(sae, name).copy_(torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, self.bounds)]))
        sae.b_dec.copy_(self.b_dec)
        return sae

    def _gather_cols(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        _dist().all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def reduce_replicated_gradients(self) -> None:
        """Sum ``b_dec``'s gradient over ranks (see the class docstring). Collective."""
        if self.b_dec.grad is None:
            self.b_dec.grad = torch.zeros_like(self.b_dec)
        _dist().all_reduce(self.b_dec.grad, group=self.group)
