"""Distributed training (``sae_fast.distributed``) on CPU with gloo, 2 spawned ranks: data
parallel against a single process on the same global batch (every architecture, a transcoder;
same steps up to fp32 reduction order), ranks bitwise in sync after every step, global
BatchTopK selection with ties and with a NaN row, resume equal to an uninterrupted run, the NaN guard stopping
every rank, bad input, ``sae-fast train`` under torchrun; latent-parallel TopK against one
SAE (outputs, gradients, training steps)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_fast.sae import SAEConfig, SparseAutoencoder
from sae_fast.training import NonFiniteLossError, TrainConfig, Trainer

WORLD = 2
ARCHS = ("topk", "batchtopk", "jumprelu", "relu")
CASES = ARCHS + ("transcoder", "batchtopk-local")  # transcoder: topk, d_out 8, skip connection, layer norm


def _entry(rank, world, store, scenario, out_dir):
    """A spawned rank: join a gloo group, run ``scenario`` (a function of this module),
    leave. Results go to files in ``out_dir``; exceptions fail the spawn.

    The rendezvous is a FileStore, not a TCPStore: a TCPStore's server lives in rank 0, and a
    rank that exits first under load could leave the other's store client or gloo pairs
    talking to a closed peer (once seen in CI as ``terminate called without an active
    exception``, SIGABRT in rank 1 at the end of a passing scenario). The barrier makes
    every rank finish its collectives before any rank tears its group down."""
    import datetime
    import gc

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{store}",
                            timeout=datetime.timedelta(seconds=120))
    try:
        globals()[scenario](rank, Path(out_dir))
        dist.barrier()
    finally:
        gc.collect()  # no tensor or work handle may keep gloo's threads alive past the group
        dist.destroy_process_group()


def _spawn(scenario, out_dir, world=WORLD):
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as rendezvous:  # outside out_dir: scenarios list its files
        mp.start_processes(_entry, args=(world, os.path.join(rendezvous, "store"), scenario, str(out_dir)),
                           nprocs=world, join=True, start_method="spawn")


# ---- the problem every scenario trains on

def _data(rows=768, d=16):
    from sae_fast.demo import DemoConfig, synthetic_data

    data, _ = synthetic_data(DemoConfig(d=d, num_features=32, samples=rows), torch.Generator().manual_seed(0))
    return data


def _make(case, seed=0):
    arch = "topk" if case == "transcoder" else case.removesuffix("-local")
    extra = {}
    if case == "transcoder":
        extra = dict(d_out=8, apply_b_dec_to_input=False, skip_connection=True, input_norm="layer_norm")
    cfg = SAEConfig(d_in=16, num_latents=48, architecture=arch, k=4, k_aux=8, l1_coeff=1e-3, l0_coeff=1e-2, **extra)
    sae = SparseAutoencoder(cfg, backend="reference")
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def _fit_args(case):
    data = _data()
    return (data, 1.5 * data[:, :8] + 0.3) if case == "transcoder" else (data,)


def _cfg(steps=8, **kw):
    # dead_tokens small enough that AuxK has dead latents after a few steps
    return TrainConfig(steps=steps, batch_size=64, lr=3e-3, warmup_steps=2, log_every=1, dead_tokens=64, seed=5,
                       **kw)


def _state(trainer):
    s = {k: v.detach().clone() for k, v in trainer.sae.state_dict().items()}
    for name, p in trainer.sae.named_parameters():  # the last step's (reduced) gradients: Adam hides their scale
        s[f"grad.{name}"] = p.grad.clone()
    s["tokens_since_fired"] = trainer.tokens_since_fired.clone()
    s["fired_count"] = trainer.fired_count.clone()
    for i, st in trainer.opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            s[f"adam{i}.{key}"] = st[key].clone()
    return s


def _save(out_dir, name, state, extra=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / f"{name}.safetensors"))
    if extra is not None:
        (out_dir / f"{name}.json").write_text(json.dumps(extra))


def _load(out_dir, name):
    from safetensors.torch import load_file

    return load_file(str(out_dir / f"{name}.safetensors"))


# ---- scenarios (run inside the spawned ranks)

def _scenario_train(rank, out):
    from sae_fast.distributed import DataParallel

    for arch in CASES:
        dp = DataParallel(batchtopk="local" if arch == "batchtopk-local" else "global")
        torch.manual_seed(100 + rank)  # ranks' RNGs differ: the broadcast from rank 0 must not care
        sae = _make(arch, seed=rank)  # so do their initial weights
        trainer = Trainer(sae, _cfg(l0_warmup_steps=4 if arch == "jumprelu" else 0), progress=False,
                          data_parallel=dp)
        in_sync = []
        for step in range(1, trainer.cfg.steps + 1):  # fit one step at a time (the data position carries on)
            history = trainer.fit(*_fit_args(arch), stop_at=step)
            in_sync.append(dp.parameters_in_sync(sae))
        _save(out, f"{arch}-rank{rank}", _state(trainer), dict(history=history, in_sync=in_sync, tokens=trainer.tokens))


def _scenario_resume(rank, out):
    from sae_fast.distributed import DataParallel

    data = _data()
    dp = DataParallel()
    whole = Trainer(_make("topk"), _cfg(steps=12), progress=False, data_parallel=dp)
    whole.fit(data)
    first = Trainer(_make("topk"), _cfg(steps=12), progress=False, data_parallel=dp,
                    metrics_path=out / "metrics.jsonl")
    first.fit(data, checkpoint_dir=out / "ckpt", checkpoint_every=5, stop_at=7)  # "killed" after step 7
    second = Trainer(_make("topk", seed=99), _cfg(steps=12), progress=False, data_parallel=dp,
                     metrics_path=out / "metrics.jsonl")
    second.resume(out / "ckpt")
    resumed_at = second.step
    second.fit(data, checkpoint_dir=out / "ckpt")
    _save(out, f"whole-rank{rank}", _state(whole))
    _save(out, f"resumed-rank{rank}", _state(second), dict(resumed_at=resumed_at))


def _scenario_guards(rank, out):
    from sae_fast.distributed import DataParallel

    dp = DataParallel()
    report = {}
    try:
        Trainer(_make("topk"), TrainConfig(steps=2, batch_size=63), progress=False, data_parallel=dp)
    except ValueError as e:
        report["odd_batch"] = str(e)

    class NaNOnRank1:
        """A fixed global batch whose last row (rank 1's slice) holds a NaN."""
        width = 16

        def __init__(self):
            self.x = _data(rows=64)
            self.x[-1, 3] = float("nan")

        def sample_for_init(self):
            return self.x[:-1]

        def next_batch(self, n):
            return self.x[:n], None

        def state(self):
            return {}

        def load_state(self, state):
            pass

    sae = _make("topk")
    trainer = Trainer(sae, _cfg(steps=3), progress=False, data_parallel=dp)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    try:
        trainer.fit(NaNOnRank1())
    except NonFiniteLossError as e:
        report["nan"] = str(e)
    report["unchanged"] = all(torch.equal(v, before[k]) for k, v in sae.state_dict().items() if k != "b_dec")
    report["in_sync"] = dp.parameters_in_sync(sae)
    if rank == 1:
        with torch.no_grad():
            sae.W_dec[3, 2] += 1e-6
    report["detects_drift"] = not dp.parameters_in_sync(sae)
    (out / f"guards-rank{rank}.json").write_text(json.dumps(report))


def _lp_case(num_latents, transcoder=False):
    """A full SAE in fp64 with biases that leave some rows fewer than k positive pre-activations,
    and its batch; the same on every rank (seeded)."""
    cfg = SAEConfig(d_in=12, num_latents=num_latents, k=5, d_out=10 if transcoder else None,
                    apply_b_dec_to_input=not transcoder)
    sae = SparseAutoencoder(cfg, dtype=torch.float64, backend="reference")
    g = torch.Generator().manual_seed(num_latents)
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(num_latents, generator=g, dtype=torch.float64) - 1.0)
        sae.b_dec.copy_(0.1 * torch.randn(cfg.output_dim, generator=g, dtype=torch.float64))
    x = torch.randn(13, 12, generator=g, dtype=torch.float64)
    y = torch.randn(13, cfg.output_dim, generator=g, dtype=torch.float64)
    return sae, x, y


def _lp_train(module, x, reconstruct, steps=3):
    """The TopK training step of ``Trainer`` (projection, Adam, unit norm), on a whole SAE or a shard."""
    from sae_fast.sae import fvu

    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        fvu(reconstruct(module), x).backward()
        if hasattr(module, "reduce_replicated_gradients"):
            module.reduce_replicated_gradients()
        module.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        module.set_decoder_norm_to_unit_norm()


def _scenario_latent_parallel(rank, out):
    from sae_fast.distributed import LatentParallelTopK
    from sae_fast.sae import fvu

    for m, transcoder in ((41, False), (30, True)):  # 41: uneven shards (21 + 20)
        sae, x, y = _lp_case(m, transcoder)
        shard = LatentParallelTopK.from_sae(sae)
        x_hat, values, indices = shard(x)
        fvu(x_hat, y if transcoder else x).backward()
        shard.reduce_replicated_gradients()
        state = dict(x_hat=x_hat.detach(), values=values, indices=indices, b_dec_grad=shard.b_dec.grad)
        state.update({f"{n}_grad": getattr(shard, n).grad for n in ("W_enc", "b_enc", "W_dec")})
        _save(out, f"lp{m}-rank{rank}", state, dict(lo=shard.lo, hi=shard.hi))
    sae, x, _ = _lp_case(41)
    shard = LatentParallelTopK.from_sae(sae)
    _lp_train(shard, x, lambda m: m(x)[0])
    _save(out, f"lp-trained-rank{rank}", {k: v.detach() for k, v in shard.to_sae().state_dict().items()})
    report = {}
    try:
        LatentParallelTopK(SAEConfig(d_in=4, num_latents=9, k=5))
    except ValueError as e:
        report["big_k"] = str(e)
    (out / f"lp-errors-rank{rank}.json").write_text(json.dumps(report))


def _tie_case():
    """BatchTopK with ties everywhere: each encoder row twice, rank 1's rows = rank 0's rows, so
    every value appears 4 times and the budget (k·B = 18) splits a group of ties."""
    cfg = SAEConfig(d_in=8, num_latents=20, architecture="batchtopk", k=3)
    sae = SparseAutoencoder(cfg, dtype=torch.float64, backend="reference")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(10, 8, generator=g, dtype=torch.float64).repeat_interleave(2, 0))
        sae.W_dec.copy_(torch.randn(20, 8, generator=g, dtype=torch.float64))
    half = torch.randn(3, 8, generator=g, dtype=torch.float64)
    return sae, torch.cat([half, half])


def _scenario_batchtopk_ties(rank, out):
    from sae_fast.distributed import DataParallel

    sae, x = _tie_case()
    codes = DataParallel().global_batchtopk(sae, x[3 * rank:3 * rank + 3])
    rows = torch.repeat_interleave(torch.arange(3), codes.row_offsets.diff()) + 3 * rank
    _save(out, f"ties-rank{rank}", dict(rows=rows, indices=codes.indices.long(), values=codes.values.detach(),
                                       threshold=codes.threshold))


def _scenario_batchtopk_nan(rank, out):
    from sae_fast.distributed import DataParallel

    sae, x = _tie_case()
    x[4] = float("nan")  # a NaN row on rank 1 only
    codes = DataParallel().global_batchtopk(sae, x[3 * rank:3 * rank + 3])
    rows = torch.repeat_interleave(torch.arange(3), codes.row_offsets.diff()) + 3 * rank
    _save(out, f"nan-rank{rank}", dict(rows=rows, indices=codes.indices.long(), values=codes.values.detach(),
                                      threshold=codes.threshold))


# ---- tests

def _single_process(arch, steps=8):
    torch.manual_seed(0)
    trainer = Trainer(_make(arch), _cfg(steps=steps, l0_warmup_steps=4 if arch == "jumprelu" else 0), progress=False)
    history = trainer.fit(*_fit_args(arch))
    return trainer, history


def test_two_ranks_match_one_process(tmp_path):
    """The core property: 2 gloo ranks on halves of each global batch make the same steps as
    one process on the whole batch (parameters, gradients, Adam moments, dead counters, the
    BatchTopK threshold, metrics), and the ranks are bitwise identical after every step.
    BatchTopK's "local" selection (per rank, documented) is held to sync and a sane
    threshold, and must differ from the 1-process run."""
    _spawn("_scenario_train", tmp_path)
    for arch in CASES:
        r0, r1 = _load(tmp_path, f"{arch}-rank0"), _load(tmp_path, f"{arch}-rank1")
        for key in r0:
            assert torch.equal(r0[key], r1[key]), (arch, key)  # ranks in lockstep, bit for bit
        meta = json.loads((tmp_path / f"{arch}-rank0.json").read_text())
        assert meta["in_sync"] == [True] * 8 and meta["tokens"] == 8 * 64  # in sync after every step
        if arch == "batchtopk-local":
            assert float(r0["batch_threshold"]) > 0
            assert not torch.allclose(r0["W_enc"], _state(_single_process("batchtopk")[0])["W_enc"], rtol=1e-4)
            continue
        single, history = _single_process(arch)
        want = _state(single)
        assert set(want) == set(r0)
        for key, value in want.items():
            if value.is_floating_point():
                torch.testing.assert_close(r0[key], value, rtol=2e-5, atol=2e-6, msg=f"{arch} {key}")
            else:
                assert torch.equal(r0[key], value), (arch, key)  # integer dead / fired counters: exact
        assert not torch.equal(want["W_dec"], _make(arch).W_dec)  # training moved the weights
        if arch in ("topk", "transcoder", "batchtopk"):  # AuxK ran (some latents were dead): its global
            assert any(row["aux"] > 0 for row in history)  # normalisation is covered
            assert any(row["aux"] > 0 for row in meta["history"])
        for got, ref in zip(meta["history"], history):
            for key in ("loss", "fvu", "l0", "aux", "dead_frac", "tokens"):
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (arch, key, got["step"])


def test_two_rank_resume_equals_uninterrupted(tmp_path):
    _spawn("_scenario_resume", tmp_path)
    for rank in range(WORLD):
        whole, resumed = _load(tmp_path, f"whole-rank{rank}"), _load(tmp_path, f"resumed-rank{rank}")
        for key in whole:
            assert torch.equal(whole[key], resumed[key]), (rank, key)
        assert json.loads((tmp_path / f"resumed-rank{rank}.json").read_text())["resumed_at"] == 7
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-12"
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # rank 0 alone wrote the log: each step once


def test_guards_stop_every_rank(tmp_path):
    _spawn("_scenario_guards", tmp_path)
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"guards-rank{rank}.json").read_text())
        assert "not divisible by the world size 2" in report["odd_batch"] and "63" in report["odd_batch"]
        assert "step 0" in report["nan"] and "rank(s) [1]" in report["nan"] and "all 2 ranks" in report["nan"]
        assert report["unchanged"] and report["in_sync"] and report["detects_drift"]


def test_data_parallel_needs_a_process_group():
    from sae_fast.distributed import DataParallel

    with pytest.raises(RuntimeError, match="not initialised"):
        DataParallel()


def test_one_rank_group_is_the_plain_trainer(tmp_path):
    """With a world of one, the hooks change nothing: bitwise the single-process trainer."""
    import torch.distributed as dist

    from sae_fast.distributed import DataParallel

    plain, _ = _single_process("topk")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        torch.manual_seed(0)
        trainer = Trainer(_make("topk"), _cfg(), progress=False, data_parallel=DataParallel())
        trainer.fit(_data())
    finally:
        dist.destroy_process_group()
    got, want = _state(trainer), _state(plain)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_init_from_env_outside_torchrun(monkeypatch):
    from sae_fast import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE"):
        distributed.init_from_env()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        distributed.init_from_env()


def test_cli_train_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 sae-fast train`` (gloo on the CPU), 4 steps then
    ``--resume`` to 6, gives the SAE a single ``sae-fast train`` process gives for the same two
    commands, and only rank 0 writes the run folder's files."""
    import numpy as np

    from sae_fast import cli

    shards = tmp_path / "acts"
    shards.mkdir()
    np.save(shards / "a.npy", _data(rows=600).numpy())
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"num_latents": 48, "k": 4, "batch_size": 100, "checkpoint_every": 3, "steps": 6,
                               "device": "cpu"}))
    single = tmp_path / "single"
    for extra in (["--steps", "4"], ["--resume"]):  # 4 steps, then resumed to 6 (the schedule changes with steps)
        assert cli.main(["train", "--data", str(shards), "--config", str(cfg), "--out", str(single), *extra]) == 0
    multi = tmp_path / "multi"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    exe = Path(sys.executable).with_name("sae-fast")  # the console script, as users run it
    launch = ["--no-python", str(exe)] if exe.exists() else ["-m", "sae_fast.cli"]

    def torchrun(*extra):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               *launch, "train", "--data", str(shards), "--config", str(cfg), "--out", str(multi),
                               *extra], env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count("done: FVU") == 1 and "2 ranks" in proc.stdout  # rank 0 alone reports
        return proc.stdout

    torchrun("--steps", "4")
    assert "resumed at step 4" in torchrun("--resume")
    a, b = SparseAutoencoder.load(single / "sae"), SparseAutoencoder.load(multi / "sae")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=2e-5, atol=2e-6, msg=name)
    logged = [len((run / "metrics.jsonl").read_text().splitlines()) for run in (single, multi)]
    assert logged == [2, 2]  # each run's last step (log_every 50); rank 0 alone wrote them
    assert (multi / "checkpoints" / "latest").read_text() == "step-6"
    assert (multi / "training.png").stat().st_size > 0


def test_latent_parallel_topk_matches_one_sae(tmp_path):
    """The dictionary split over 2 ranks: reconstruction, chosen values / ids and every
    gradient equal one SAE's with the same weights (fp64), for an autoencoder with uneven
    shards and for a transcoder."""
    from sae_fast.sae import fvu

    _spawn("_scenario_latent_parallel", tmp_path)
    for m, transcoder in ((41, False), (30, True)):
        sae, x, y = _lp_case(m, transcoder)
        codes = sae.encode(x)
        assert (codes.values == 0).any()  # some rows have < k positive: the zero-entry rule is exercised
        x_hat = sae.decode(codes)
        fvu(x_hat, y if transcoder else x).backward()
        spans = []
        for rank in range(WORLD):
            got = _load(tmp_path, f"lp{m}-rank{rank}")
            lo, hi = json.loads((tmp_path / f"lp{m}-rank{rank}.json").read_text()).values()
            spans.append((lo, hi))
            torch.testing.assert_close(got["x_hat"], x_hat.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got["values"], codes.values.detach(), rtol=1e-12, atol=1e-12)
            positive = codes.values > 0
            assert torch.equal(got["indices"][positive], codes.indices.long()[positive])
            torch.testing.assert_close(got["b_dec_grad"], sae.b_dec.grad, rtol=1e-10, atol=1e-12)
            for name in ("W_enc", "b_enc", "W_dec"):
                want = getattr(sae, name).grad[lo:hi]
                torch.testing.assert_close(got[f"{name}_grad"], want, rtol=1e-10, atol=1e-12, msg=name)
            assert got["W_dec_grad"].abs().sum() > 0
        assert spans == [(0, (m + 1) // 2), ((m + 1) // 2, m)]
        sae.zero_grad()
    sae, x, _ = _lp_case(41)  # 3 training steps on the shards = 3 on the whole SAE (gathered back by to_sae)
    _lp_train(sae, x, lambda m: m.decode(m.encode(x)))
    for rank in range(WORLD):
        got = _load(tmp_path, f"lp-trained-rank{rank}")
        for name, value in sae.state_dict().items():
            torch.testing.assert_close(got[name], value.detach(), rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.equal(got["W_enc"], _lp_case(41)[0].W_enc)
    report = json.loads((tmp_path / "lp-errors-rank0.json").read_text())
    assert "k=5 exceeds the smallest shard (4 latents of 9 over 2 ranks)" in report["big_k"]


def test_cli_model_error_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 computes the --model activations; when it cannot (here: no such model folder)
    every rank stops with its error, cleanly (the others waited at a barrier that did not
    match what rank 0 did next)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sae_fast.cli", "train", "--model", str(tmp_path / "nope"), "--device", "cpu",
                           "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("not 'smollm2' nor a local Hugging Face model folder") == 1, proc.stderr[-3000:]
    # rank 1 used to pass the barrier rank 0's teardown reached, miss the shards and crash
    assert "[rank1]" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr[-3000:]  # no rank traceback


def test_cli_help_documents_torchrun(capsys):
    from sae_fast import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "torchrun --nproc-per-node 8 --no-python sae-fast train" in text and "global batch" in text


def test_global_batchtopk_selection_with_ties(tmp_path):
    """The ranks' kept entries together are exactly what one process keeps over the global
    batch, ties at the cut included (broken in global row-major order, as the op does)."""
    from sae_fast import ops

    _spawn("_scenario_batchtopk_ties", tmp_path)
    sae, x = _tie_case()
    want = ops.batchtopk_encode(x, sae.W_enc, sae.b_enc, 3, b_dec=sae.b_dec, backend="reference")
    want_rows = torch.repeat_interleave(torch.arange(6), want.row_offsets.diff())
    cut = want.values.detach().min()
    # The cut splits a tie. Tied pre-activations are bitwise equal within one GEMM, but a
    # differently shaped GEMM (the reference works a latent block at a time) may round them
    # differently in the last ulp, so count the tie group with a fp64-ulp-sized margin.
    pre = (x @ sae.W_enc.T).detach().flatten()
    assert int((want.values == cut).sum()) < int(torch.isclose(pre, cut, rtol=0, atol=1e-12).sum())
    got = [_load(tmp_path, f"ties-rank{r}") for r in range(WORLD)]
    entries = {(int(r), int(i)): float(v) for g in got for r, i, v in zip(g["rows"], g["indices"], g["values"])}
    expected = {(int(r), int(i)): float(v) for r, i, v in zip(want_rows, want.indices, want.values.detach())}
    assert entries == expected and len(entries) == 18
    assert all(float(g["threshold"]) == float(cut) for g in got)


def test_global_batchtopk_keeps_nan_rows_as_the_op_does(tmp_path):
    """A NaN row on one rank keeps NaN codes within the global budget and the other rows keep
    what one process keeps over the whole batch (before: a NaN cut emptied every rank's rows,
    with a finite loss)."""
    from sae_fast import ops

    _spawn("_scenario_batchtopk_nan", tmp_path)
    sae, x = _tie_case()
    x[4] = float("nan")
    want = ops.batchtopk_encode(x, sae.W_enc, sae.b_enc, 3, b_dec=sae.b_dec, backend="reference")
    want_rows = torch.repeat_interleave(torch.arange(6), want.row_offsets.diff())
    got = [_load(tmp_path, f"nan-rank{r}") for r in range(WORLD)]
    rows = torch.cat([g["rows"] for g in got])
    values = torch.cat([g["values"] for g in got])
    # The NaN row: as many NaN codes as one process keeps (which latents is unspecified).
    assert int((rows == 4).sum()) == int((want_rows == 4).sum()) > 0
    assert bool(torch.isnan(values[rows == 4]).all())
    entries = {(int(r), int(i)): float(v) for g in got for r, i, v in zip(g["rows"], g["indices"], g["values"])
               if int(r) != 4}
    expected = {(int(r), int(i)): float(v) for r, i, v in zip(want_rows, want.indices, want.values.detach())
                if int(r) != 4}
    assert entries == expected and len(entries) == 18 - int((want_rows == 4).sum())
    assert all(float(g["threshold"]) == float(want.threshold) for g in got)
    assert bool(torch.isfinite(want.threshold))
