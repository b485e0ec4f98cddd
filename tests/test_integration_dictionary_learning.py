"""sae_fast.integrations.dictionary_learning against the library itself.

Every test builds objects with dictionary_learning's own constructors (odd sizes, random
weights and non-zero biases set explicitly: its init zeroes them), accelerates one, and
compares it with an unpatched deepcopy twin. The integration logic runs on the reference
backend (fast on CPU); the ``default`` tests run the same comparisons on the default
backend (the Triton kernels, under the interpreter on CPU).
"""

import copy

import pytest
import torch

from helpers import import_dictionary_learning  # noqa: E402

import_dictionary_learning()  # also undoes nnsight's process-wide torch patches (see helpers)

from dictionary_learning.dictionary import (  # noqa: E402
    AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder)
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer  # noqa: E402
from dictionary_learning.trainers.jumprelu import JumpReluTrainer  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer  # noqa: E402

import sae_fast.integrations as integrations  # noqa: E402
from sae_fast.integrations import dictionary_learning as dl  # noqa: E402

D, M, K, N = 37, 75, 5, 16
REF = "reference"


def randomize(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


def close(a, b, what="", rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_outputs(a, b, what):
    assert type(a) is type(b), f"{what}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, tuple):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b)):
            close(u, v, f"{what}[{i}]")
    else:
        close(a, b, what)


def assert_same_grads(m1, m2, what):
    for (name, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), f"{what}: {name} has a gradient the library does not"
            continue
        assert p.grad is not None, f"{what}: {name} got no gradient"
        close(p.grad, q.grad, f"{what}: grad {name}", rtol=1e-4, atol=1e-5)


def make_topk(cls=AutoEncoderTopK):
    ae = randomize(cls(D, M, K))
    assert ae.encoder.bias.abs().min() > 0 and ae.b_dec.abs().min() > 0
    return ae


def make_jumprelu(apply_b_dec=False):
    ae = randomize(JumpReluAutoEncoder(D, M))
    with torch.no_grad():
        ae.threshold.uniform_(0.0, 0.6)
    ae.apply_b_dec_to_input = apply_b_dec
    return ae


def make_trainer(cls, **kw):
    # the trainers need no wandb or model: layer / lm_name are only recorded
    common = dict(steps=100, activation_dim=D, dict_size=M, layer=0, lm_name="none", device="cpu", warmup_steps=0)
    if cls is JumpReluTrainer:
        tr = cls(sparsity_warmup_steps=10, **common, **kw)
    else:
        tr = cls(k=K, **common, **kw)
    randomize(tr.ae)
    return tr


def batch(n=N, *lead):
    return torch.randn(*lead, n, D)


# ----------------------------------------------------------------------------- SAE modules


@pytest.mark.parametrize("shape", [(N,), (2, 3), ()], ids=["2d", "3d", "1d"])
def test_topk_encode_forward(shape):
    ae = make_topk()
    ae.threshold.fill_(0.25)
    twin = copy.deepcopy(ae)
    handle = dl.accelerate(ae, backend=REF)
    assert handle.patched == ["encode", "forward"] and "decode" not in ae.__dict__
    x = torch.randn(*shape, D)
    for use_threshold in (False, True):
        out, ref = ae.encode(x, use_threshold=use_threshold), twin.encode(x, use_threshold=use_threshold)
        assert_same_outputs(out, ref, f"encode(use_threshold={use_threshold})")
        assert (out > 0).sum(-1).le(K).all() or use_threshold
        out = ae.encode(x, return_topk=True, use_threshold=use_threshold)
        ref = twin.encode(x, return_topk=True, use_threshold=use_threshold)
        assert len(out) == 4  # the library's own path: the dense post-ReLU activations are returned
        close(out[0], ref[0], "return_topk f")
        close(out[3], ref[3], "return_topk post_relu")
        close(out[1].sort(-1).values, ref[1].sort(-1).values, "return_topk values")
    for output_features in (False, True):
        assert_same_outputs(ae(x, output_features=output_features), twin(x, output_features=output_features),
                            f"forward(output_features={output_features})")
    close(ae.decode(ae.encode(x)), twin.decode(twin.encode(x)), "decode(encode)")


def test_topk_gradients_and_no_copies():
    ae, x = make_topk(), batch()
    twin = copy.deepcopy(ae)
    params = {n: p for n, p in ae.named_parameters()}
    dl.accelerate(ae, backend=REF)
    assert {n: p for n, p in ae.named_parameters()} == params and set(ae.state_dict()) == set(twin.state_dict())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(N, D)
    x_hat, f = ae(x1, output_features=True)
    x_hat_ref, f_ref = twin(x2, output_features=True)
    ((x_hat * g).sum() + f.pow(2).sum()).backward()
    ((x_hat_ref * g).sum() + f_ref.pow(2).sum()).backward()
    assert_same_grads(ae, twin, "forward")
    close(x1.grad, x2.grad, "grad x")
    # the weight gradient of the transposed decoder lands on the library's [d, M] parameter
    assert ae.decoder.weight.grad.shape == (D, M)
    # the dense threshold path (written by the threshold kernel) is differentiable too
    ae.zero_grad(), twin.zero_grad()
    ae.threshold.fill_(0.25), twin.threshold.fill_(0.25)
    ae.encode(x, use_threshold=True).pow(2).sum().backward()
    twin.encode(x, use_threshold=True).pow(2).sum().backward()
    assert_same_grads(ae, twin, "encode(use_threshold=True)")


def test_k_buffer_is_read_again_after_in_place_change():
    ae, x = make_topk(), batch()
    twin = copy.deepcopy(ae)
    dl.accelerate(ae, backend=REF)
    assert ((ae.encode(x) > 0).sum(-1) == K).all()
    ae.load_state_dict({**ae.state_dict(), "k": torch.tensor(3, dtype=torch.int)})
    twin.k.fill_(3)
    out = ae.encode(x)
    assert ((out > 0).sum(-1) == 3).all()
    close(out, twin.encode(x), "encode after k=3")


@pytest.mark.parametrize("threshold", [-1.0, 0.4], ids=["fresh", "trained"])
def test_batchtopk_encode_forward(threshold):
    ae = make_topk(BatchTopKSAE)
    ae.threshold.fill_(threshold)
    twin = copy.deepcopy(ae)
    handle = dl.accelerate(ae, backend=REF)
    assert handle.patched == ["encode", "forward"]
    x = batch()
    for use_threshold in (True, False):
        out, ref = ae.encode(x, use_threshold=use_threshold), twin.encode(x, use_threshold=use_threshold)
        assert_same_outputs(out, ref, f"encode(use_threshold={use_threshold})")
        out = ae.encode(x, return_active=True, use_threshold=use_threshold)
        ref = twin.encode(x, return_active=True, use_threshold=use_threshold)
        assert_same_outputs(tuple(t.float() for t in out), tuple(t.float() for t in ref), "return_active")
    batch_f = ae.encode(x, use_threshold=False)
    assert (batch_f > 0).sum() == K * N and (batch_f > 0).sum(-1).unique().numel() > 1  # rows get different counts
    # a 3-D input keeps the library's own batch rule (k·x.size(0) entries over all rows)
    x3 = batch(4, 2)
    close(ae.encode(x3, use_threshold=False), twin.encode(x3, use_threshold=False), "3-D batch encode")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    for output_features in (False, True):
        out, ref = ae(x1, output_features=output_features), twin(x2, output_features=output_features)
        assert_same_outputs(out, ref, f"forward(output_features={output_features})")
    g = torch.randn(N, D)
    (out[0] * g).sum().add(out[1].sum()).backward()
    (ref[0] * g).sum().add(ref[1].sum()).backward()
    assert_same_grads(ae, twin, "forward")
    close(x1.grad, x2.grad, "grad x")
    # the batch selection's gradient too
    ae.zero_grad(), twin.zero_grad()
    ae.encode(x, use_threshold=False).pow(2).sum().backward()
    twin.encode(x, use_threshold=False).pow(2).sum().backward()
    assert_same_grads(ae, twin, "batch encode")


def test_fewer_positive_activations_than_k():
    """TopK rows / a BatchTopK batch with fewer positive pre-activations than k / k·N: the
    library keeps zeros where the op stores nothing or other zero-valued latents; the dense
    features, outputs and losses agree, and BatchTopK's dead-latent tracking too (the library
    does not count zeros as active either)."""
    x = batch()
    for cls in (AutoEncoderTopK, BatchTopKSAE):
        ae = make_topk(cls)
        with torch.no_grad():
            ae.encoder.bias.fill_(-4.0)
        twin = copy.deepcopy(ae)
        dl.accelerate(ae, backend=REF)
        f = ae.encode(x, use_threshold=False)
        assert (f > 0).sum(-1).min() < K and 0 < (f > 0).sum() < K * N
        close(f, twin.encode(x, use_threshold=False), f"{cls.__name__} encode")
        assert_same_outputs(ae(x, output_features=True), twin(x, output_features=True), f"{cls.__name__} forward")
    tr = make_trainer(BatchTopKTrainer, threshold_start_step=0)
    with torch.no_grad():
        tr.ae.encoder.bias.fill_(-4.0)
    twin = copy.deepcopy(tr)
    dl.accelerate(tr, backend=REF)
    close(tr.loss(x, step=1), twin.loss(x, step=1), "BatchTopK loss")
    assert_same_state(tr, twin)


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_jumprelu_encode_forward(apply_b_dec):
    ae = make_jumprelu(apply_b_dec)
    with torch.no_grad():
        ae.threshold[:4] = -0.2  # θ < 0: relu(pre·H(pre-θ)) differs from pre·H(pre-θ)
    twin = copy.deepcopy(ae)
    assert dl.accelerate(ae, backend=REF).patched == ["encode", "forward"]
    x = batch()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert_same_outputs(ae.encode(x), twin.encode(x), "encode")
    assert_same_outputs(ae.encode(x, output_pre_jump=True), twin.encode(x, output_pre_jump=True), "output_pre_jump")
    assert_same_outputs(ae.encode(x[0]), twin.encode(x[0]), "encode 1-D")
    assert_same_outputs(ae(x), twin(x), "forward")
    out, ref = ae(x1, output_features=True), twin(x2, output_features=True)
    assert_same_outputs(out, ref, "forward(output_features=True)")
    g = torch.randn(N, D)
    ((out[0] * g).sum() + out[1].sum()).backward()
    ((ref[0] * g).sum() + ref[1].sum()).backward()
    assert ae.threshold.grad is None and twin.threshold.grad is None
    assert_same_grads(ae, twin, "forward")
    close(x1.grad, x2.grad, "grad x")


# ----------------------------------------------------------------------------- trainers


class CountCalls:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.fn(*a, **kw)


def fired_latents(twin_ae, x):
    """The latents the library's TopK marks as fired for this batch."""
    with torch.no_grad():
        return torch.unique(twin_ae.encode(x, return_topk=True)[2])


def assert_same_state(tr, twin):
    assert torch.equal(tr.num_tokens_since_fired, twin.num_tokens_since_fired)
    assert tr.dead_features == twin.dead_features
    assert getattr(tr, "effective_l0", None) == getattr(twin, "effective_l0", None)
    pre, ref = getattr(tr, "pre_norm_auxk_loss", None), getattr(twin, "pre_norm_auxk_loss", None)
    if isinstance(ref, torch.Tensor):
        close(pre, ref, "pre_norm_auxk_loss")
    else:
        assert pre == ref
    close(tr.ae.threshold, twin.ae.threshold, "threshold")


@pytest.mark.parametrize("case", ["fused", "recomputed", "none_dead"])
def test_topk_trainer_loss_auxk(case, monkeypatch):
    tr, x = make_trainer(TopKTrainer, threshold_start_step=0), batch()
    tr.dead_feature_threshold = 40
    fired = fired_latents(tr.ae, x)
    ntsf = torch.full((M,), 40 - N)  # every latent that does not fire in this batch becomes dead
    if case == "none_dead":
        ntsf.zero_()
    ntsf[fired] = 0
    if case == "recomputed":  # two latents dead before the batch fire in it: the aux set shrinks
        ntsf[fired[:2]] = 50
    tr.num_tokens_since_fired = ntsf
    twin = copy.deepcopy(tr)
    handle = dl.accelerate(tr, backend=REF)
    assert handle.patched == ["loss", "AutoEncoderTopK.encode", "AutoEncoderTopK.forward"]
    counter = CountCalls(dl.topk_encode)
    monkeypatch.setattr(dl, "topk_encode", counter)
    loss, ref = tr.loss(x, step=1), twin.loss(x, step=1)
    assert counter.calls == (2 if case == "recomputed" else 1)
    close(loss, ref, "loss")
    assert_same_state(tr, twin)
    assert (tr.dead_features > 0) == (case != "none_dead")
    assert tr.ae.threshold > 0  # set from -1 by this step's update
    loss.backward(), ref.backward()
    assert_same_grads(tr.ae, twin.ae, "loss")
    # the AuxK term trains the encoder of dead latents (absent from the main codes)
    dead = tr.num_tokens_since_fired >= tr.dead_feature_threshold
    assert (tr.ae.encoder.weight.grad[dead].abs().sum() > 0) == (case != "none_dead")
    # a second step: the threshold's running average, logging output
    log, log_ref = tr.loss(x, step=2, logging=True), twin.loss(x, step=2, logging=True)
    assert type(log).__name__ == "LossLog" and log._fields == log_ref._fields
    for a, b in zip(log[:3], log_ref[:3]):
        close(a, b, "logging")
    for key in log_ref.losses:
        close(torch.tensor(log.losses[key]), torch.tensor(log_ref.losses[key]), key)
    assert_same_state(tr, twin)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)`")
def test_topk_trainer_update_and_auxk_off():
    tr, x = make_trainer(TopKTrainer, threshold_start_step=0), batch()
    tr.dead_feature_threshold = 20
    twin = copy.deepcopy(tr)
    dl.accelerate(tr, backend=REF)
    for step in range(3):  # step 0 sets b_dec to the geometric median
        close(torch.tensor(tr.update(step, x)), torch.tensor(twin.update(step, x)), f"update {step}")
        assert_same_state(tr, twin)
        for (name, p), (_, q) in zip(tr.ae.named_parameters(), twin.ae.named_parameters()):
            close(p, q, f"{name} after update {step}", rtol=1e-4, atol=1e-5)
    tr.auxk_alpha = twin.auxk_alpha = 0  # no AuxK: the library skips it, dead_features stays as it was
    close(tr.loss(x, step=3), twin.loss(x, step=3), "loss without auxk")
    assert_same_state(tr, twin)


@pytest.mark.parametrize("case", ["fused", "recomputed", "none_dead"])
def test_batchtopk_trainer_loss_auxk(case, monkeypatch):
    """AuxK from the fused batch selection (no second encoder pass) when the dead set guessed
    before the batch is exact; recomputed when a guessed-dead latent fires in the batch."""
    tr, x = make_trainer(BatchTopKTrainer, threshold_start_step=0), batch()
    tr.dead_feature_threshold = 40
    with torch.no_grad():
        fired = (tr.ae.encode(x, use_threshold=False) > 0).any(0).nonzero().view(-1)
    ntsf = torch.full((M,), 40 - N)  # every latent that does not fire in this batch becomes dead
    if case == "none_dead":
        ntsf.zero_()
    ntsf[fired] = 0
    if case == "recomputed":  # two latents dead before the batch fire in it: the aux set shrinks
        ntsf[fired[:2]] = 50
    tr.num_tokens_since_fired = ntsf
    twin = copy.deepcopy(tr)
    dl.accelerate(tr, backend=REF)
    counter = CountCalls(dl.topk_encode)  # the second pass (_aux_codes) goes through topk_encode
    monkeypatch.setattr(dl, "topk_encode", counter)
    loss, ref = tr.loss(x, step=1), twin.loss(x, step=1)
    assert counter.calls == (1 if case == "recomputed" else 0)
    close(loss, ref, "loss")
    assert_same_state(tr, twin)
    assert (tr.dead_features > 0) == (case != "none_dead")
    loss.backward(), ref.backward()
    assert_same_grads(tr.ae, twin.ae, "loss")
    dead = tr.num_tokens_since_fired >= tr.dead_feature_threshold
    assert (tr.ae.encoder.weight.grad[dead].abs().sum() > 0) == (case != "none_dead")


@pytest.mark.parametrize("dead", [False, True])
def test_batchtopk_trainer_loss(dead):
    tr, x = make_trainer(BatchTopKTrainer, threshold_start_step=1), batch()
    tr.dead_feature_threshold = 40 if dead else 10_000
    if dead:
        tr.num_tokens_since_fired = torch.full((M,), 40 - N)
    twin = copy.deepcopy(tr)
    assert dl.accelerate(tr, backend=REF).patched == ["loss", "BatchTopKSAE.encode", "BatchTopKSAE.forward"]
    for step in (1, 2, 3):  # step 1: no threshold update; 2: set from -1; 3: running average
        loss, ref = tr.loss(x, step=step), twin.loss(x, step=step)
        close(loss, ref, f"loss step {step}")
        assert_same_state(tr, twin)
        assert (tr.ae.threshold > 0) == (step >= 2)
        loss.backward(), ref.backward()
        assert_same_grads(tr.ae, twin.ae, f"loss step {step}")
        tr.ae.zero_grad(), twin.ae.zero_grad()
    assert (tr.dead_features > 0) == dead
    log, log_ref = tr.loss(x, step=4, logging=True), twin.loss(x, step=4, logging=True)
    for a, b in zip(log[:3], log_ref[:3]):
        close(a, b, "logging")
    assert (log.f != 0).sum() == K * N
    # the learned threshold is what forward uses at inference
    x2 = batch()
    close(tr.ae(x2), twin.ae(x2), "forward with the trained threshold")


def make_jumprelu_trainer(bandwidth=0.2):
    tr = make_trainer(JumpReluTrainer, bandwidth=bandwidth)
    with torch.no_grad():
        tr.ae.threshold.uniform_(0.0, 0.6)
        tr.ae.threshold[:3] = -0.3  # θ < 0: the library counts inactive entries in L0
        tr.ae.threshold[3:6] = 0.05  # |θ| < ε/2: every inactive entry gets an L0 threshold gradient
    tr.ae.apply_b_dec_to_input = True  # ignored by the library's trainer
    tr.dead_feature_threshold = 30
    return tr


def test_jumprelu_trainer_loss():
    tr, x = make_jumprelu_trainer(), batch()
    twin = copy.deepcopy(tr)
    assert dl.accelerate(tr, backend=REF).patched == ["loss", "JumpReluAutoEncoder.encode",
                                                          "JumpReluAutoEncoder.forward"]
    with torch.no_grad():  # the test covers entries on both sides within ε/2 of θ
        pre = x @ tr.ae.W_enc + tr.ae.b_enc
        u = (pre - tr.ae.threshold) / tr.bandwidth
        assert ((u > 0) & (u < 0.5)).sum() > 10 and ((u > -0.5) & (u <= 0)).sum() > 10
    for step in (3, 30):  # inside and after the sparsity warmup
        loss, ref = tr.loss(x, step=step), twin.loss(x, step=step)
        close(loss, ref, f"loss step {step}")
        assert_same_state(tr, twin)
        loss.backward(), ref.backward()
        assert twin.ae.threshold.grad[3:6].abs().min() > 0
        assert_same_grads(tr.ae, twin.ae, f"loss step {step}")
        tr.ae.zero_grad(), twin.ae.zero_grad()
    log, log_ref = tr.loss(x, step=31, logging=True), twin.loss(x, step=31, logging=True)
    assert log._fields == log_ref._fields == ("x", "recon", "f", "losses")
    for a, b in zip(log[:3], log_ref[:3]):
        close(a, b, "logging")
    assert log.losses.keys() == log_ref.losses.keys()


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)`")
def test_jumprelu_trainer_update():
    tr, x = make_jumprelu_trainer(), batch()
    twin = copy.deepcopy(tr)
    dl.accelerate(tr, backend=REF)
    for step in range(2):
        close(torch.tensor(tr.update(step, x)), torch.tensor(twin.update(step, x)), f"update {step}")
        for (name, p), (_, q) in zip(tr.ae.named_parameters(), twin.ae.named_parameters()):
            close(p, q, f"{name} after update {step}", rtol=1e-4, atol=1e-5)
    assert_same_state(tr, twin)


def test_trainer_under_autocast():
    """trainSAE wraps update in torch.autocast: x arrives in the autocast dtype, weights fp32."""
    tr, x = make_trainer(TopKTrainer, threshold_start_step=0), batch()
    twin = copy.deepcopy(tr)
    dl.accelerate(tr, backend=REF)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ref = tr.loss(x.bfloat16(), step=1), twin.loss(x.bfloat16(), step=1)
        x_hat, x_hat_ref = tr.ae(x), twin.ae(x)
    assert x_hat.dtype == x_hat_ref.dtype == torch.float32  # decoder(f) + fp32 b_dec promotes
    close(x_hat, x_hat_ref, "autocast forward", rtol=0.05, atol=0.05)
    close(loss.float(), ref.float(), "autocast loss", rtol=0.02, atol=0.0)
    loss.backward()
    assert tr.ae.encoder.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- the handle


def test_undo_and_context_manager():
    ae, x = make_topk(), batch()
    twin = copy.deepcopy(ae)
    before = dict(ae.__dict__)
    with dl.accelerate(ae, backend=REF) as handle:
        assert handle.active and "encode" in ae.__dict__
        assert "encode, forward" in repr(handle)
    assert not handle.active and ae.__dict__.keys() == before.keys()
    assert ae.encode.__func__ is AutoEncoderTopK.encode
    tr = make_trainer(JumpReluTrainer)
    handle = integrations.accelerate(tr, backend=REF)  # the package's dispatcher
    assert handle.library == "dictionary_learning" and "loss" in tr.__dict__ and "forward" in tr.ae.__dict__
    handle.undo()
    assert "loss" not in tr.__dict__ and "forward" not in tr.ae.__dict__ and "encode" not in tr.ae.__dict__
    close(ae(x), twin(x), "after undo")


class OverridingTopK(AutoEncoderTopK):
    def encode(self, x, return_topk=False, use_threshold=False):
        return super().encode(x, return_topk, use_threshold) * 2


@pytest.mark.parametrize("make", [
    lambda: AutoEncoder(D, M),
    lambda: AutoEncoderNew(D, M),
    lambda: GatedAutoEncoder(D, M),
    lambda: MatryoshkaBatchTopKSAE(D, M, K, [25, 50]),
    lambda: OverridingTopK(D, M, K),
    lambda: torch.nn.Linear(D, M),
], ids=["AutoEncoder", "AutoEncoderNew", "Gated", "Matryoshka", "override", "foreign"])
def test_unsupported_left_untouched(make):
    obj = make()
    randomize(obj)
    twin = copy.deepcopy(obj)
    before = dict(obj.__dict__)
    with pytest.warns(UserWarning, match="not accelerated"):
        handle = dl.accelerate(obj, backend=REF)
    assert handle.patched == [] and not handle.active and "nothing" in repr(handle)
    assert obj.__dict__ == before
    x = batch()
    close(obj(x), twin(x), "unsupported forward")


def test_trainer_with_foreign_ae_warns():
    tr = make_trainer(TopKTrainer)
    tr.ae = AutoEncoder(D, M)
    with pytest.warns(UserWarning, match="nothing patched"):
        handle = dl.accelerate(tr)
    assert handle.patched == [] and "loss" not in tr.__dict__


def test_second_accelerate_patches_nothing_and_undo_restores():
    """A second accelerate on a patched AE or trainer captured the first patch's methods, so
    undoing both left the object patched for good; now it warns and patches nothing."""
    for obj in (make_topk(), make_trainer(TopKTrainer)):
        before = dict(vars(obj))
        first = dl.accelerate(obj, backend=REF)
        with pytest.warns(UserWarning, match="already has its own"):
            second = dl.accelerate(obj, backend=REF)
        assert second.patched == [] and first.patched
        first.undo()
        second.undo()
        assert vars(obj).keys() == before.keys()
        inner = getattr(obj, "ae", None)
        assert inner is None or ("encode" not in vars(inner) and "forward" not in vars(inner))


def test_deep_copy_of_an_accelerated_ae_falls_back_on_itself():
    """Fallback paths (return_topk, output_pre_jump, a trainer's non-2-D input) call the
    library's method on the copy, not on the object that was accelerated."""
    for ae, call in ((make_topk(), lambda m, x: m.encode(x, return_topk=True)),
                     (make_jumprelu(), lambda m, x: m.encode(x, output_pre_jump=True))):
        dl.accelerate(ae, backend=REF)
        twin = copy.deepcopy(ae)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(3.0)
        plain = copy.deepcopy(twin)
        for name in ("encode", "forward"):
            del vars(plain)[name]
        x = batch()
        assert_same_outputs(call(twin, x), call(plain, x), type(ae).__name__)
    tr = make_trainer(TopKTrainer)
    dl.accelerate(tr, backend=REF)
    copied = copy.deepcopy(tr)
    copied.loss(batch(4, 2), step=0)  # 3-D: the library's loss, on the copy's counters
    assert torch.equal(tr.num_tokens_since_fired, torch.zeros_like(tr.num_tokens_since_fired))
    assert copied.num_tokens_since_fired.any()


def test_half_precision_activations_into_an_fp32_ae():
    """The library promotes bf16/fp16 activations against its fp32 weights (``x - b_dec``);
    the accelerated paths did not and raised a dtype mismatch."""
    for ae in (make_topk(), make_topk(BatchTopKSAE), make_jumprelu(apply_b_dec=True)):
        twin = copy.deepcopy(ae)
        dl.accelerate(ae, backend=REF)
        for dtype in (torch.bfloat16, torch.float16):
            x = batch().to(dtype)
            assert_same_outputs(ae(x, output_features=True), twin(x, output_features=True), f"{type(ae).__name__}")
    tr = make_trainer(TopKTrainer)
    twin = copy.deepcopy(tr)
    dl.accelerate(tr, backend=REF)
    x = batch().to(torch.bfloat16)
    close(tr.loss(x, step=0), twin.loss(x, step=0), "TopKTrainer.loss")


# ----------------------------------------------------------------------------- default backend
# One loss + backward per trainer, and the threshold paths of the modules, on the default
# backend (the Triton kernels; under the interpreter on CPU, hence small batches).


def one_step_on_default_backend(tr, x, step):
    twin = copy.deepcopy(tr)
    dl.accelerate(tr)
    loss, ref = tr.loss(x, step=step), twin.loss(x, step=step)
    close(loss, ref, "loss")
    assert_same_state(tr, twin)
    loss.backward(), ref.backward()
    assert_same_grads(tr.ae, twin.ae, "loss")
    return tr


def test_default_backend_topk_trainer():
    tr, x = make_trainer(TopKTrainer, threshold_start_step=0), batch(8)
    tr.dead_feature_threshold = 40
    tr.num_tokens_since_fired = torch.full((M,), 40 - 8)
    tr.num_tokens_since_fired[fired_latents(tr.ae, x)] = 0  # the fused AuxK candidates are exact
    tr = one_step_on_default_backend(tr, x, step=1)
    assert tr.dead_features > 0 and tr.ae.threshold > 0


def test_default_backend_batchtopk_trainer():
    tr = one_step_on_default_backend(make_trainer(BatchTopKTrainer, threshold_start_step=0), batch(8), step=1)
    assert tr.ae.threshold > 0


def test_default_backend_jumprelu_trainer():
    one_step_on_default_backend(make_jumprelu_trainer(), batch(8), step=3)


def test_default_backend_threshold_paths():
    x = batch(8)
    for ae in (make_topk(BatchTopKSAE), make_jumprelu(apply_b_dec=True)):
        if isinstance(ae, BatchTopKSAE):
            ae.threshold.fill_(0.4)
        twin = copy.deepcopy(ae)
        dl.accelerate(ae)
        assert_same_outputs(ae.encode(x), twin.encode(x), f"{type(ae).__name__} encode")
        out, ref = ae(x, output_features=True), twin(x, output_features=True)
        assert_same_outputs(out, ref, f"{type(ae).__name__} forward")
        if isinstance(ae, BatchTopKSAE):  # (the JumpReLU trainer test covers that backward)
            out[0].sum().backward(), ref[0].sum().backward()
            assert_same_grads(ae, twin, f"{type(ae).__name__} forward")
