"""Training-step time of each library's own training step, with and without
``sae_fast.accelerate()``, on the same GPU.

    python benchmarks/bench_integrations.py [--quick] [--libraries saelens,sparsify,dictionary_learning]
    python benchmarks/bench_integrations.py --dry-run   # CPU, tiny shape, untimed: checks the script

One step = the library's training forward pass (its losses, AuxK on a dead mask where it has
one), backward, and its optimizer step, exactly as its trainer runs them:

* ``saelens``: ``TopKTrainingSAE.training_forward_pass`` → ``loss.backward()`` → Adam.
* ``sparsify``: ``SparseCoder.forward(x, dead_mask=...)`` → ``fvu + auxk_alpha·auxk`` →
  backward, gradient projection, Adam, decoder renormalisation (its ``Trainer``'s order).
* ``dictionary_learning``: ``TopKTrainer.update(step, x)`` (loss, backward, clipping, Adam,
  renormalisation, its dead-feature bookkeeping).

Providers per library: ``<lib>`` (unpatched) and ``<lib>+sae_fast`` (the same object after
``sae_fast.accelerate``). Shapes: d=2304, k=64, N=4096 tokens per step, M ∈ {131072,
1048576}; weights in bf16 by default (``--dtype``) so that the 1M case's parameters, gradients
and Adam state (about 9.4 GB per copy of both matrices in bf16) fit on an 80 GB card; an
out-of-memory is recorded as a row with a note. FLOPs: the dense step's 6·N·d·M·2 (encoder and
decoder GEMMs, forward and backward) for the unpatched object; the rate columns of the
accelerated rows use the same count, so their TFLOP/s is "dense-equivalent".
"""

from __future__ import annotations

import argparse

import torch

try:
    from . import harness
except ImportError:
    import harness

OP = "integrations_train_step"
MAIN = {"N": 4096, "d": 2304, "M": 131072, "k": 64}
SWEEP = {"M": [1048576]}
LIBRARIES = ("saelens", "sparsify", "dictionary_learning")


def shape_plan(quick: bool) -> list[dict]:
    return harness.one_at_a_time(MAIN, SWEEP, quick)


def _dead_mask(M: int, device) -> torch.Tensor:
    # a few percent dead, as mid-training: AuxK runs over real work
    g = torch.Generator(device="cpu").manual_seed(1)
    return (torch.rand(M, generator=g) < 0.05).to(device)


def saelens_step(shape, dtype, device):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(d_in=shape["d"], d_sae=shape["M"], k=shape["k"], device=str(device),
                                dtype=str(dtype).removeprefix("torch."))
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    coefficients = {name: (c.value if hasattr(c, "value") else c) for name, c in sae.get_coefficients().items()}
    dead = _dead_mask(shape["M"], device)

    def step(x):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return sae, step


def sparsify_step(shape, dtype, device):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(shape["d"], SparseCoderConfig(num_latents=shape["M"], k=shape["k"]), device=device, dtype=dtype)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-4)
    dead = _dead_mask(shape["M"], device)

    def step(x):
        out = coder(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()

    return coder, step


def dictionary_learning_step(shape, dtype, device):
    from dictionary_learning.trainers.top_k import TopKTrainer

    trainer = TopKTrainer(steps=10**6, activation_dim=shape["d"], dict_size=shape["M"], k=shape["k"], layer=0,
                          lm_name="bench", device=str(device), warmup_steps=0)
    trainer.ae.to(dtype)
    counter = iter(range(10**9))

    def step(x):
        trainer.update(next(counter), x)

    return trainer, step


BUILDERS = {"saelens": saelens_step, "sparsify": sparsify_step, "dictionary_learning": dictionary_learning_step}
DRY_SHAPE = {"N": 64, "d": 48, "M": 384, "k": 8}


def _parameters(obj):
    module = obj.ae if hasattr(obj, "ae") else obj  # dictionary_learning's trainer holds its AutoEncoder
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def dry_run(libraries) -> list:
    """The benchmark's own builders and steps on the CPU at a tiny fp32 shape, so a lease does
    not find a broken builder: one step unpatched and one accelerated from the same seed and
    input; each must change the parameters and leave them finite. Returns and prints
    [(library, max |Δparam| between the two)], for information only: after one Adam step every
    parameter moves by about the learning rate whatever its gradient's size, so a near-zero
    gradient that differs in rounding moves by ±lr (the gradients' parity is tested in
    tests/test_integration_*.py)."""
    import sae_fast

    results = []
    x = torch.randn(DRY_SHAPE["N"], DRY_SHAPE["d"], generator=torch.Generator().manual_seed(2))
    for lib in libraries:
        after = []
        for accelerated in (False, True):
            torch.manual_seed(0)
            obj, step = BUILDERS[lib](DRY_SHAPE, torch.float32, torch.device("cpu"))
            before = _parameters(obj)
            if accelerated:
                sae_fast.accelerate(obj)
            step(x.clone())
            params = _parameters(obj)
            if all(torch.equal(params[n], before[n]) for n in params):
                raise RuntimeError(f"bench_integrations dry run: {lib} step left every parameter unchanged")
            if not all(bool(t.isfinite().all()) for t in params.values()):
                raise RuntimeError(f"bench_integrations dry run: {lib} step made a parameter non-finite")
            after.append(params)
        diff = max(float((after[0][n] - after[1][n]).abs().max()) for n in after[0])
        results.append((lib, diff))
        print(f"{lib}: one step unpatched vs accelerated, max |delta param| = {diff:.3g}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--libraries", default=",".join(LIBRARIES))
    p.add_argument("--dtype", default="bf16", choices=sorted(harness.DTYPES))
    p.add_argument("--list", action="store_true", help="print the planned shapes and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: one step of each library at a tiny shape, unpatched and accelerated, untimed")
    args = p.parse_args(argv)
    shapes = shape_plan(args.quick)
    if args.list:
        for s in shapes:
            print(harness.shape_str(s))
        return []
    if args.dry_run:
        return dry_run(args.libraries.split(","))
    harness.require_cuda()
    sae_fast = harness.import_sae_fast()
    peaks = harness.measure_peaks()
    dtype = harness.DTYPES[args.dtype]
    device = torch.device("cuda")
    rows = []
    for shape in shapes:
        N, d, M = shape["N"], shape["d"], shape["M"]
        flops = 12 * N * d * M
        for lib in args.libraries.split(","):
            for accelerated in (False, True):
                name = f"{lib}+sae_fast" if accelerated else lib
                obj = step = None
                try:
                    torch.manual_seed(0)
                    obj, step = BUILDERS[lib](shape, dtype, device)
                    if accelerated:
                        sae_fast.accelerate(obj)
                    x = torch.randn(N, d, device=device, dtype=dtype)
                    step(x)  # warm-up: Triton compiles, Adam state allocates
                    timing = harness.bench(lambda: step(x), rep_ms=200)
                    rows.append(harness.make_row(OP, name, "step", shape, args.dtype, timing=timing, flops=flops,
                                                 peaks=peaks))
                except torch.OutOfMemoryError as e:
                    rows.append(harness.make_row(OP, name, "step", shape, args.dtype, note=f"OOM: {str(e)[:60]}"))
                except ImportError as e:
                    rows.append(harness.make_row(OP, name, "step", shape, args.dtype, note=f"not installed: {e}"))
                except Exception as e:  # a failing provider is a row; the others still run and are written
                    rows.append(harness.make_row(OP, name, "step", shape, args.dtype,
                                                 error=f"{type(e).__name__}: {e}"[:300]))
                obj = step = None  # free the weights before the next build
                torch.cuda.empty_cache()
    harness.append_results(rows, args.out)
    harness.print_table(rows)
    return rows


if __name__ == "__main__":
    harness.run_cli(main)
