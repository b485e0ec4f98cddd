"""A small SAE trainer on top of ``SparseAutoencoder``, fed by the sources of ``sae_fast.data``.

Adam with linear warmup and linear decay to 0; ``b_dec`` initialised to the data mean; dead
latents tracked over a window of tokens (a latent is dead if it has not fired in the last
``dead_tokens`` tokens) and fed to AuxK; the BatchTopK inference threshold as a running mean
of the batch thresholds; the JumpReLU L0 coefficient warmed up linearly; decoder rows kept at
unit norm (TopK/BatchTopK); a JSONL metrics log; training stops with a clear error on a
non-finite loss, before the step that would corrupt the weights.

Checkpoints (``save_checkpoint`` / ``resume``) hold the SAE, Adam's state, the schedule, the
dead-latent counters and the data source's position, as safetensors + JSON (no pickle), each
in its own folder ``step-N`` with a ``latest`` pointer replaced atomically: a run killed
mid-write leaves the previous checkpoint intact, and a resumed run is bitwise the
uninterrupted one (the sources' orders are functions of the seed and the position).

Data-parallel training (``data_parallel=sae_fast.distributed.DataParallel()``, one process per
GPU under ``torchrun``): ``batch_size`` is then the global batch, each rank trains on its slice,
and the hooks marked ``dp`` below sum the loss shares, gradients and dead-latent counts across
ranks; only rank 0 writes logs and checkpoints. See ``sae_fast.distributed`` for why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from .sae import SparseAutoencoder


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 50
    decay_start: float = 0.8  # fraction of steps after which the lr decays linearly to 0
    dead_tokens: int = 100_000
    threshold_momentum: float = 0.99  # BatchTopK running threshold
    l0_warmup_steps: int = 0  # JumpReLU: L0 coefficient ramps from 0 over these steps
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"TrainConfig: {name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("steps", "warmup_steps", "l0_warmup_steps", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an int >= 0")
        for name in ("batch_size", "dead_tokens", "log_every"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "a positive int")
        if not is_real(self.lr) or self.lr <= 0:
            bad("lr", "a finite number > 0")
        if not is_real(self.decay_start) or not 0 <= self.decay_start <= 1:
            bad("decay_start", "a fraction in [0, 1]")
        if not is_real(self.threshold_momentum) or not 0 <= self.threshold_momentum < 1:
            bad("threshold_momentum", "in [0, 1)")


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, sae: SparseAutoencoder, cfg: TrainConfig, *, metrics_path: Optional[Path] = None,
                 progress: bool = True, data_parallel=None):
        """``data_parallel``: a ``sae_fast.distributed.DataParallel`` to train on every rank of
        its process group (collective: every rank builds its Trainer; rank 0's weights are
        broadcast); None trains in this process alone."""
        self.sae, self.cfg = sae, cfg
        self.dp = data_parallel
        if self.dp is not None:
            self.dp.local_batch(cfg.batch_size)  # a clear error for a batch the ranks cannot split
            self.dp.broadcast_module(sae)
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        m = sae.cfg.num_latents
        self.tokens_since_fired = torch.zeros(m, dtype=torch.int64, device=sae.W_enc.device)
        self.fired_count = torch.zeros(m, dtype=torch.int64, device=sae.W_enc.device)
        self.step = 0
        self.tokens = 0
        self.data_state: Optional[dict] = None  # the source's position, restored by resume
        self.metrics_path = metrics_path
        self.progress = progress and self.is_main
        self.history: list[dict] = []

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and checkpoints (rank 0, or a single process)."""
        return self.dp is None or self.dp.is_main

    def _lr_factor(self, step: int) -> float:
        c = self.cfg
        warm = min(1.0, (step + 1) / max(c.warmup_steps, 1))
        start = int(c.decay_start * c.steps)
        decay = 1.0 if step < start else max(0.0, (c.steps - step) / max(c.steps - start, 1))
        return warm * decay

    @torch.no_grad()
    def init_b_dec(self, data: torch.Tensor) -> None:
        """b_dec = the mean of the sample in the space b_dec lives in: with ``input_norm=
        "layer_norm"`` that is the normalised rows (the raw mean, added to normalised
        reconstructions, started such a run at FVU ~200). A transcoder's sample holds only the
        targets, so their own row statistics stand in for the inputs' there."""
        if self.sae.cfg.input_norm != "none":
            data = self.sae._normalise(data.float())[0]
        self.sae.b_dec.copy_(data.float().mean(0).to(self.sae.b_dec.dtype))
        if self.dp is not None:  # every rank saw the same global sample; rank 0's mean is the one
            self.dp.broadcast_(self.sae.b_dec)

    def _fired(self, out) -> torch.Tensor:
        """The latent id of every firing (token, latent) entry in this batch (any format)."""
        codes = out.codes
        if isinstance(codes, torch.Tensor):  # dense relu activations
            return (codes > 0).nonzero()[:, 1]
        values, indices = codes.values, codes.indices
        return indices.reshape(-1)[values.reshape(-1) > 0]

    def train_step(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> dict:
        sae, c = self.sae, self.cfg
        sae.train()
        dead = self.tokens_since_fired >= c.dead_tokens
        kwargs = {}
        if sae.cfg.architecture in ("topk", "batchtopk") and sae.cfg.k_aux > 0 and bool(dead.any()):
            kwargs["dead_mask"] = dead
        if self.dp is not None and sae.cfg.architecture == "batchtopk" and self.dp.batchtopk == "global":
            kwargs["batch_select"] = self.dp.global_batchtopk
        out = sae(x, y, **kwargs)
        loss = out.loss
        if sae.cfg.architecture == "jumprelu" and c.l0_warmup_steps:
            loss = out.fvu + sae.cfg.l0_coeff * min(1.0, self.step / c.l0_warmup_steps) * out.aux_loss
        if self.dp is not None:  # this rank's share of the global loss; the NaN guard on every rank
            loss, global_metrics = self.dp.share_loss(self, out, x, y)
        elif not torch.isfinite(loss):
            raise NonFiniteLossError(f"step {self.step}: loss is {loss.item()} (fvu {out.fvu.item()}); "
                                     "training stopped before this step changed the weights")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.dp is not None:
            self.dp.all_reduce_gradients(sae.parameters())
        if sae.cfg.architecture in ("topk", "batchtopk"):
            sae.remove_gradient_parallel_to_decoder_directions()
        lr = self.opt.param_groups[0]["lr"]  # the rate this step uses (read before the schedule moves on)
        self.opt.step()
        self.sched.step()
        if sae.cfg.architecture in ("topk", "batchtopk"):
            sae.set_decoder_norm_to_unit_norm()
        if sae.cfg.architecture == "batchtopk":
            with torch.no_grad():
                t = out.codes.threshold.to(sae.batch_threshold.dtype)  # (the buffer is >= fp32: see SAE)
                if self.dp is not None:  # the smallest value kept on any rank
                    t = self.dp.min_(t)
                cur = sae.batch_threshold
                sae.batch_threshold.copy_(t if cur < 0 else c.threshold_momentum * cur + (1 - c.threshold_momentum) * t)
        fired = self._fired(out)
        if self.dp is not None:
            n = self.dp.update_dead_latents(self, fired, x.shape[0])
            metrics = global_metrics
        else:
            n = x.shape[0]
            self.tokens_since_fired += n
            self.tokens_since_fired[fired] = 0
            self.fired_count.index_add_(0, fired, torch.ones_like(fired))
            metrics = dict(loss=loss.item(), fvu=out.fvu.item(), l0=out.l0.item(), aux=out.aux_loss.item())
        self.step += 1
        self.tokens += n
        row = dict(step=self.step, tokens=self.tokens, loss=metrics["loss"], fvu=metrics["fvu"], l0=metrics["l0"],
                   aux=metrics["aux"], dead_frac=dead.float().mean().item(), lr=lr)
        return row

    def fit(self, data, target: Optional[torch.Tensor] = None, *,
            checkpoint_dir: Optional[Path] = None, checkpoint_every: int = 0,
            stop_at: Optional[int] = None) -> list[dict]:
        """Train up to ``cfg.steps`` (or ``stop_at``, leaving the schedule unchanged),
        continuing from the current step (after ``resume``). ``data``: a [T, d] tensor
        (with an optional transcoder ``target``) or a source from ``sae_fast.data``
        (``ShardedActivations`` streams shards with bounded RAM). With ``checkpoint_dir``, a
        checkpoint every ``checkpoint_every`` steps and at the end."""
        from tqdm import tqdm

        from .data import InMemoryActivations

        c = self.cfg
        source = InMemoryActivations(data, target, seed=c.seed) if isinstance(data, torch.Tensor) else data
        self._check_widths(source)
        if self.data_state is not None:
            source.load_state(self.data_state)
        if self.dp is not None:  # next_batch(global batch) -> this rank's slice
            source = self.dp.shard_source(source, c.batch_size)
        if self.step == 0:
            self.init_b_dec(source.sample_for_init())
        saved_at = None
        bar = tqdm(total=c.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        log = None
        if self.metrics_path and self.is_main:
            # the file restarts from the rows this trainer holds: after a resume, the rows a
            # crashed run logged past its checkpoint are dropped (the run logs them again)
            _write_lines(Path(self.metrics_path), [json.dumps(row) for row in self.history])
            log = open(self.metrics_path, "a")
        t0, tokens0 = time.perf_counter(), self.tokens
        try:
            while self.step < min(c.steps, stop_at or c.steps):
                x, y = source.next_batch(c.batch_size)
                dev, dt = self.sae.W_enc.device, self.sae.W_enc.dtype
                row = self.train_step(x.to(dev, dt), None if y is None else y.to(dev, dt))
                self.data_state = source.state()
                if self.step % c.log_every == 0 or self.step == c.steps:
                    row["tokens_per_s"] = (self.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
                    self.history.append(row)
                    if log:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_frac']:.1%}",
                                    tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if checkpoint_dir and checkpoint_every and self.step % checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_dir)
                    saved_at = self.step
            if checkpoint_dir and saved_at != self.step:  # (the last step may have just been saved)
                self.save_checkpoint(checkpoint_dir)
        finally:
            bar.close()
            if log:
                log.close()
        return self.history

    def _check_widths(self, source) -> None:
        """Clear errors for data that does not fit the SAE (the first matmul's are bare)."""
        cfg = self.sae.cfg
        width = getattr(source, "width", None)
        if width is not None and width != cfg.d_in:
            raise ValueError(f"Trainer.fit: the activations are {width} wide but the SAE's d_in is {cfg.d_in}")
        target = getattr(source, "target", None)
        if target is not None and (target.dim() != 2 or target.shape[1] != cfg.output_dim):
            raise ValueError(f"Trainer.fit: the targets must be [T, {cfg.output_dim}] (the SAE's output width), "
                             f"got {tuple(target.shape)}")
        if target is None and cfg.output_dim != cfg.d_in:
            raise ValueError(f"Trainer.fit: this transcoder maps d_in={cfg.d_in} to d_out={cfg.output_dim}; "
                             "pass its targets (fit(data, target))")

    def feature_density(self) -> torch.Tensor:
        """Firing frequency per latent over the tokens seen (for the density histogram)."""
        return self.fired_count.float() / max(self.tokens, 1)


    # ---- checkpoints

    def save_checkpoint(self, root: Path) -> Path:
        """Write ``root/step-N`` completely (``step-N.1``... when that folder exists: saved
        again at one step), then point ``root/latest`` at it (atomic rename) and only then
        remove the other step folders. Data parallel: rank 0 writes (every rank holds the same
        state) while the others wait (collective)."""
        root = Path(root)
        final = self._write_checkpoint(root) if self.is_main else None
        if self.dp is not None:
            self.dp.barrier()
        return final if final is not None else root / (root / "latest").read_text().strip()

    def _write_checkpoint(self, root: Path) -> Path:
        from safetensors.torch import save_file

        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step}"
        again = 0
        while final.exists():  # never delete what `latest` may point to before the switch
            again += 1
            final = root / f"step-{self.step}.{again}"
        tmp = root / f".step-{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.sae.save(tmp / "sae")
        names = {id(p): n for n, p in self.sae.named_parameters()}
        opt = self.opt.state_dict()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        tensors = {"tokens_since_fired": self.tokens_since_fired.cpu(), "fired_count": self.fired_count.cpu()}
        for i, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"adam.{names[id(params[i])]}.{key}"] = torch.as_tensor(value).cpu().contiguous()
        save_file(tensors, str(tmp / "trainer.safetensors"))
        meta = dict(step=self.step, tokens=self.tokens, data_state=self.data_state, config=dataclasses.asdict(self.cfg),
                    param_groups=opt["param_groups"], param_names=[names[id(p)] for p in params],
                    scheduler=self.sched.state_dict(), history=self.history)
        (tmp / "trainer.json").write_text(json.dumps(meta))
        tmp.rename(final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self, root: Path) -> None:
        """Load the checkpoint ``root/latest`` points to into this trainer and its SAE (built
        with the same configuration). Data parallel: every rank loads it (a filesystem all
        ranks see); the global batch, not the world size, must match the saved run's."""
        from safetensors.torch import load_file

        from .sae import SparseAutoencoder

        root = Path(root)
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"resume: no checkpoint in {root} ({latest} missing)")
        ckpt = root / latest.read_text().strip()
        meta = json.loads((ckpt / "trainer.json").read_text())
        saved = SparseAutoencoder.load(ckpt / "sae", device=self.sae.W_enc.device, dtype=self.sae.W_enc.dtype)
        if saved.cfg != self.sae.cfg:
            raise ValueError(f"resume: {ckpt} holds an SAE with config {saved.cfg}, this trainer's is {self.sae.cfg}")
        self.sae.load_state_dict(saved.state_dict())
        tensors = load_file(str(ckpt / "trainer.safetensors"))
        dev = self.sae.W_enc.device
        names = {id(p): n for n, p in self.sae.named_parameters()}
        current = [names[id(p)] for g in self.opt.param_groups for p in g["params"]]
        if meta["param_names"] != current:
            raise ValueError(f"resume: {ckpt} was written for parameters {meta['param_names']}, not {current}")
        state = {}
        for i, name in enumerate(meta["param_names"]):
            entry = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"adam.{name}.")}
            if entry:
                state[i] = {k: (v if k == "step" else v.to(dev)) for k, v in entry.items()}
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.sched.load_state_dict(meta["scheduler"])
        # this trainer's config applies from here on (a longer run, a new lr): the checkpoint's
        # schedule state carries the old base lr, so it is replaced; differences are reported
        # because the run then differs from the uninterrupted one
        saved_cfg, now = meta["config"], dataclasses.asdict(self.cfg)
        changed = {k: (saved_cfg[k], now[k]) for k in now if k in saved_cfg and saved_cfg[k] != now[k]}
        if changed.keys() - {"steps", "log_every"}:
            listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            warnings.warn(f"resume: {ckpt} was trained with a different TrainConfig ({listing}); this trainer's values "
                          f"apply from step {meta['step']}", stacklevel=2)
        if saved_cfg.get("lr") != self.cfg.lr:
            self.sched.base_lrs = [self.cfg.lr for _ in self.opt.param_groups]
            for group in self.opt.param_groups:
                group["initial_lr"] = self.cfg.lr
                group["lr"] = self.cfg.lr * self._lr_factor(self.sched.last_epoch)
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self.fired_count.copy_(tensors["fired_count"])
        self.step, self.tokens, self.data_state = meta["step"], meta["tokens"], meta["data_state"]
        self.history = meta["history"]


def _write_lines(path: Path, lines: list) -> None:
    """Replace ``path`` with ``lines`` through a temporary file (a crash keeps the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
