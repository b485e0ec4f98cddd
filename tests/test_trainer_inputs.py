"""The trainer's edges: bad configurations and data get clear errors before any step runs,
and a resumed run's learning rate, metrics file and throughput are those of this run."""

import json

import numpy as np
import pytest
import torch

from sae_fast import cli
from sae_fast import training
from sae_fast.sae import SAEConfig, SparseAutoencoder
from sae_fast.training import TrainConfig, Trainer


def _data(n=96, d=6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _sae(**kw):
    return SparseAutoencoder(SAEConfig(d_in=6, num_latents=12, k=2, **kw), backend="reference")


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("batch_size", True), ("log_every", 0), ("steps", -1), ("lr", 0.0), ("lr", float("nan")),
    ("decay_start", 1.5), ("threshold_momentum", 1.0), ("dead_tokens", 0), ("warmup_steps", -2), ("seed", 1.5),
])
def test_train_config_rejects(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig: {field}"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("k_aux", 13), ("k_aux", -1), ("k_aux", 2.0), ("initial_threshold", 0.0), ("l1_coeff", -1.0),
    ("aux_coeff", float("inf")), ("d_out", 0),
])
def test_sae_config_rejects(field, value):
    kw = {field: value}
    if field == "d_out":
        kw["apply_b_dec_to_input"] = False
    with pytest.raises(ValueError, match=f"SAEConfig: {field}"):
        SAEConfig(d_in=6, num_latents=12, k=2, **kw)


def test_data_that_does_not_fit_the_sae_is_refused_before_a_step():
    cfg = TrainConfig(steps=3, batch_size=8)
    trainer = Trainer(_sae(), cfg, progress=False)
    with pytest.raises(ValueError, match="7 wide but the SAE's d_in is 6"):
        trainer.fit(_data(d=7))
    transcoder = SparseAutoencoder(SAEConfig(d_in=6, num_latents=12, k=2, d_out=4, apply_b_dec_to_input=False),
                                   backend="reference")
    t = Trainer(transcoder, cfg, progress=False)
    with pytest.raises(ValueError, match="pass its targets"):
        t.fit(_data())
    with pytest.raises(ValueError, match=r"targets must be \[T, 4\]"):
        t.fit(_data(), _data(d=5))
    assert trainer.step == 0 and t.step == 0
    t.fit(_data(), _data(d=4))
    assert t.step == 3


def test_empty_activation_files_are_refused(tmp_path):
    from sae_fast.data import ShardedActivations

    np.save(tmp_path / "empty.npy", np.zeros((0, 6), np.float32))
    with pytest.raises(ValueError, match="holds no rows"):
        ShardedActivations(tmp_path / "empty.npy")
    with pytest.raises(ValueError, match="chunk_rows"):
        ShardedActivations(tmp_path / "empty.npy", chunk_rows=0)


def _record_adam_lrs(trainer) -> list:
    """The learning rate of each Adam step the trainer takes from now on."""
    used = []
    real_step = trainer.opt.step

    def step_and_record(*args, **kwargs):
        used.append(trainer.opt.param_groups[0]["lr"])
        return real_step(*args, **kwargs)

    trainer.opt.step = step_and_record
    return used


def test_logged_lr_is_the_one_each_step_used():
    """Each metrics row carries the learning rate its own Adam step ran with (it once showed
    the next step's: read after the scheduler had moved on)."""
    cfg = TrainConfig(steps=6, batch_size=8, lr=1.0, warmup_steps=4, log_every=1, dead_tokens=64)
    trainer = Trainer(_sae(), cfg, progress=False)
    used = _record_adam_lrs(trainer)
    history = trainer.fit(torch.randn(64, 6, generator=torch.Generator().manual_seed(0)))
    assert [row["lr"] for row in history] == used and used[0] == 0.25 and len(used) == 6


def test_resume_applies_the_new_learning_rate_and_says_so(tmp_path):
    data = _data()
    cfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1, dead_tokens=64)
    Trainer(_sae(), cfg, progress=False).fit(data, checkpoint_dir=tmp_path, stop_at=4)
    faster = TrainConfig(**{**cfg.__dict__, "lr": 5e-2, "steps": 10})
    trainer = Trainer(_sae(), faster, progress=False)
    with pytest.warns(UserWarning, match=r"lr: 0.01 -> 0.05"):
        trainer.resume(tmp_path)
    used = _record_adam_lrs(trainer)
    history = trainer.fit(data)
    # the new config's schedule at steps 4..9 (decay from step 8 of 10): base 5e-2
    assert used == pytest.approx([5e-2 * trainer._lr_factor(s) for s in range(4, 10)])
    assert [row["lr"] for row in history[4:]] == used
    # the same config again: no warning, and steps alone may change silently (a longer run)
    Trainer(_sae(), cfg, progress=False).fit(data, checkpoint_dir=tmp_path / "b", stop_at=4)
    longer = Trainer(_sae(), TrainConfig(**{**cfg.__dict__, "steps": 20}), progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        longer.resume(tmp_path / "b")


def test_metrics_file_after_a_crash_and_resume_has_each_step_once(tmp_path):
    """A run killed after its step-4 checkpoint had logged steps 5 and 6; the resumed run
    logs them again. The file ends with steps 1..8 once each, equal to the history."""
    data = _data()
    cfg = TrainConfig(steps=8, batch_size=8, log_every=1, dead_tokens=64)
    metrics = tmp_path / "metrics.jsonl"
    first = Trainer(_sae(), cfg, progress=False, metrics_path=metrics)
    real = first.train_step

    def crash_at_seven(*args, **kwargs):
        if first.step == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    first.train_step = crash_at_seven
    with pytest.raises(KeyboardInterrupt):
        first.fit(data, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=4)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    second = Trainer(_sae(), cfg, progress=False, metrics_path=metrics)
    second.resume(tmp_path / "ckpt")
    history = second.fit(data)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows == history


def test_throughput_after_resume_counts_this_runs_tokens(tmp_path, monkeypatch):
    data = _data()
    cfg = TrainConfig(steps=6, batch_size=8, log_every=1, dead_tokens=64)
    Trainer(_sae(), cfg, progress=False).fit(data, checkpoint_dir=tmp_path, stop_at=3)
    trainer = Trainer(_sae(), cfg, progress=False)
    trainer.resume(tmp_path)

    class Clock:  # one second per reading
        now = 0.0

        @classmethod
        def perf_counter(cls):
            cls.now += 1.0
            return cls.now

    monkeypatch.setattr(training, "time", Clock)
    history = trainer.fit(data)
    # step 4 is this run's first: 8 tokens in the 1 s between the start and its row
    assert history[3]["step"] == 4 and history[3]["tokens_per_s"] == pytest.approx(8.0)


def test_cli_refuses_bad_numbers_and_flags_that_would_be_ignored(tmp_path, capsys):
    np.save(tmp_path / "acts.npy", _data(n=64).numpy())
    base = ["train", "--data", str(tmp_path / "acts.npy"), "--out", str(tmp_path / "run"), "--steps", "2",
            "--batch-size", "16", "--k", "2"]
    for extra, message in ((["--num-latents", "0"], "num_latents must be a positive int"),
                           (["--batch-size", "0"], "batch_size must be a positive int"),
                           (["--max-tokens", "1000"], "--max-tokens only apply with --model"),
                           (["--layer", "3"], "--layer only apply with --model"),
                           (["--checkpoint-every", "-1"], "checkpoint_every must be >= 0")):
        assert cli.main(base + extra) == 2
        assert message in capsys.readouterr().err
    np.save(tmp_path / "empty.npy", np.zeros((0, 6), np.float32))
    assert cli.main(["train", "--data", str(tmp_path / "empty.npy"), "--out", str(tmp_path / "run")]) == 2
    assert "holds no rows" in capsys.readouterr().err
    assert cli.main(["demo", "--steps", "0", "--out", str(tmp_path / "demo")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    # small M: the default k_aux (d / 2 = 3) is capped at M
    assert cli.main(base + ["--num-latents", "2"]) == 0


def test_sharded_source_batch_sizes_near_the_buffer(tmp_path):
    """Chunks of 10, 10, 1 and 1 rows, two per buffer: a batch of 15 fits only when both big
    chunks share a buffer, which happens in some epochs (it gave up after two); a batch no
    buffer can ever hold, or more than all rows, is refused at once with the reason."""
    from sae_fast.data import ShardedActivations

    data = torch.arange(22 * 3, dtype=torch.float32).view(22, 3)
    for name, rows in (("a", data[:10]), ("b", data[10:20]), ("c", data[20:21]), ("d", data[21:22])):
        np.save(tmp_path / f"{name}.npy", rows.numpy())
    for seed in range(4):
        src = ShardedActivations(tmp_path, seed=seed, chunk_rows=10, chunks_per_buffer=2)
        for _ in range(3):
            x, _ = src.next_batch(15)
            assert x.shape == (15, 3) and len(set(x[:, 0].tolist())) == 15
    src = ShardedActivations(tmp_path, chunk_rows=10, chunks_per_buffer=3)  # buffers of at most 10 + 10 + 1
    with pytest.raises(ValueError, match="no buffer can hold a batch of 22 rows \\(at most 21\\)"):
        src.next_batch(22)
    with pytest.raises(ValueError, match="22 activations are fewer than one batch of 23"):
        ShardedActivations(tmp_path, chunk_rows=10, chunks_per_buffer=4).next_batch(23)
