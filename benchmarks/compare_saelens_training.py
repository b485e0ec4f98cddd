"""Side by side: sae_fast's TopK trainer and SAELens's own TopK trainer, same activations,
same batches, same budget, same machine.

Both see the identical sequence of batches (one seeded permutation per epoch of the
activations); each runs at its own defaults except the learning rate, which is swept over the
same grid for both (``--lrs``), so neither side wins by a better-chosen step size. The final
SAEs are scored by one function: FVU over every activation vector,
``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, in fp32.

SAELens side: ``TopKTrainingSAE`` + ``SAETrainer`` fed by a plain iterator (its
``data_provider`` interface), at its defaults: decoder rows initialised at norm 0.1 with the
encoder as the decoder's transpose, pre-activations rescaled by decoder norms, AuxK on dead
latents, gradient-norm clipping at 1, constant lr. sae_fast side: ``Trainer.train_step`` at
its defaults (unit-norm decoder with gradient projection, b_dec from the data mean, AuxK,
linear warmup then decay over the last 20%).

    python benchmarks/compare_saelens_training.py --data /tmp/cmp/activations \\
        --out benchmarks/results/saelens_topk_smollm2.json

``--data``: a .npy / .safetensors file or a folder of shards (``sae-fast train --model smollm2
--layer 15 --corpus austen`` writes them to OUT/activations).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

import torch


def load_all(path: str) -> torch.Tensor:
    from sae_fast.data import load_activations

    return load_activations(path).float()


def batches(x: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """The same batch sequence for both trainers: a fresh seeded permutation every epoch."""
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(x.shape[0], generator=g), 0
    for _ in range(steps):
        if pos + batch_size > x.shape[0]:
            perm, pos = torch.randperm(x.shape[0], generator=g), 0
        yield x[perm[pos:pos + batch_size]]
        pos += batch_size


@torch.no_grad()
def fvu(reconstruct, x: torch.Tensor, chunk: int = 4096) -> float:
    err = 0.0
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk]
        err += (xs - reconstruct(xs)).pow(2).sum().item()
    return err / (x - x.mean(0)).pow(2).sum().item()


def train_sae_fast(x, args, lr):
    from sae_fast.sae import SAEConfig, SparseAutoencoder
    from sae_fast.training import TrainConfig, Trainer

    torch.manual_seed(args.seed)
    d = x.shape[1]
    sae = SparseAutoencoder(SAEConfig(d_in=d, num_latents=args.num_latents, architecture="topk", k=args.k,
                                      k_aux=d // 2), backend=args.backend)
    sae.reset_parameters(torch.Generator().manual_seed(args.seed))
    trainer = Trainer(sae, TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed),
                      progress=False)
    trainer.init_b_dec(x)
    t0 = time.perf_counter()
    for xb in batches(x, args.batch_size, args.steps, args.seed):
        trainer.train_step(xb)
    seconds = time.perf_counter() - t0
    sae.eval()
    return fvu(lambda xs: sae(xs).x_hat, x), seconds


def train_saelens(x, args, lr):
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(args.seed)
    d = x.shape[1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=args.num_latents, k=args.k, device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch_size,
                           train_batch_size_samples=args.batch_size, lr=lr, lr_end=lr / 10, device="cpu")
    trainer = SAETrainer(cfg, sae, batches(x, args.batch_size, args.steps, args.seed))
    t0 = time.perf_counter()
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
        trainer.fit()
    seconds = time.perf_counter() - t0
    sae.eval()
    return fvu(lambda xs: sae(xs), x), seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--num-latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lrs", default="3e-4,1e-3,4e-3", help="comma-separated learning rates tried for both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="sae_fast backend (default: auto)")
    p.add_argument("--only", choices=["sae_fast", "saelens"], default=None)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    x = load_all(args.data)
    print(f"{x.shape[0]} activations of d={x.shape[1]}; M={args.num_latents}, k={args.k}, "
          f"{args.steps} steps of {args.batch_size}; torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    for lr in [float(s) for s in args.lrs.split(",")]:
        for name, fn in (("sae_fast", train_sae_fast), ("saelens", train_saelens)):
            if args.only and name != args.only:
                continue
            f, s = fn(x, args, lr)
            rows.append(dict(trainer=name, lr=lr, fvu=round(f, 5), seconds=round(s, 2)))
            print(f"{name:9s} lr {lr:g}: FVU {f:.4f}, {s:.1f} s", flush=True)
    for name in ("sae_fast", "saelens"):
        mine = [r for r in rows if r["trainer"] == name]
        if mine:
            best = min(mine, key=lambda r: r["fvu"])
            print(f"best {name}: FVU {best['fvu']:.4f} at lr {best['lr']:g} ({best['seconds']:.1f} s)")
    if args.out:
        import sae_lens

        meta = dict(data=str(args.data), n=x.shape[0], d=x.shape[1], num_latents=args.num_latents, k=args.k,
                    steps=args.steps, batch_size=args.batch_size, seed=args.seed, torch=torch.__version__,
                    sae_lens=getattr(sae_lens, "__version__", "?"), machine=platform.machine(),
                    threads=torch.get_num_threads(), python=sys.version.split()[0])
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
