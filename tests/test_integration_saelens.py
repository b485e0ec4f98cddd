"""sae_fast.integrations.saelens against SAELens itself: every accelerated SAE is compared with
an unpatched deepcopy (its twin), built with SAELens's own configs and constructors.

Most tests run the ops with ``backend="reference"`` (plain torch): the adapter's logic does not
depend on the backend, and under the Triton interpreter one fused-op call costs seconds.
``test_default_backend_*`` run the default backend (Triton under the interpreter on CPU, the
GPU kernels on a GPU). A call counter on the ops proves the fast path ran: an equality with
SAELens that a silent fallback would also pass is not a test.
"""

import collections
import copy
import warnings

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes import (  # noqa: E402
    AbsTopKSAE,
    AbsTopKSAEConfig,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

import sae_fast.integrations  # noqa: E402
from sae_fast.integrations import saelens as adapter  # noqa: E402
from sae_fast.integrations.saelens import accelerate  # noqa: E402

D, M, K = 37, 75, 5
REF = "reference"
OPS = ("topk_encode", "batchtopk_encode", "jumprelu_encode", "jumprelu_training_forward", "sparse_decode",
       "sparse_decode_csr")
PATCHED = ("encode", "decode", "forward", "training_forward_pass")


@pytest.fixture
def calls(monkeypatch):
    """Counts the op calls the adapter makes."""
    counts = collections.Counter()
    for name in OPS:
        fn = getattr(adapter, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(adapter, name, counted)
    return counts


def randomize(sae, seed=0):
    """Random weights with non-zero biases and decoder rows of different norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d, m = sae.W_enc.shape
        sae.W_enc.copy_(torch.randn(d, m, generator=g) / d ** 0.5)
        W = torch.randn(m, d, generator=g)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True) * (0.5 + 1.5 * torch.rand(m, 1, generator=g)))
        sae.b_enc.copy_(0.3 * torch.randn(m, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d, generator=g))
    return sae


def twin(sae, backend=REF):
    """(unpatched deepcopy, handle) with ``sae`` accelerated."""
    ref = copy.deepcopy(sae)
    handle = accelerate(sae, backend=backend)
    assert handle.patched, handle
    return ref, handle


def rebuilt_twin(sae):
    """A twin built anew from the config (not a deepcopy: SAELens's hook_z and layer-norm
    closures capture their SAE, so a deepcopy's would still write to the original)."""
    ref = type(sae)(copy.deepcopy(sae.cfg))
    ref.load_state_dict(sae.state_dict())
    assert accelerate(sae, backend=REF).patched
    return ref


def dense(t):
    return t.to_dense() if t.is_sparse else t


def close(a, b, rel=2e-5):
    """Max abs difference within ``rel`` of the reference's max magnitude (fp32 vs fp32 with
    another summation order)."""
    a, b = dense(a).detach().double(), dense(b).detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(b.abs().max().item(), 1e-6)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} > {rel:.0e} x {scale:.3e}"


def grads_close(sae, ref, rel=2e-5):
    for (name, p), (_, q) in zip(sae.named_parameters(), ref.named_parameters()):
        if q.grad is None or not q.grad.any():
            assert p.grad is None or not p.grad.any(), f"{name}: gradient where SAELens has none"
            continue
        assert p.grad is not None, f"{name}: no gradient"
        close(p.grad, q.grad, rel)


def step_input(x, dead=None, coefficients=None):
    return TrainStepInput(sae_in=x, coefficients=coefficients or {}, dead_neuron_mask=dead, n_training_steps=0,
                          is_logging_step=False)


def dead_mask(num_dead, seed=1):
    mask = torch.zeros(M, dtype=torch.bool)
    mask[torch.randperm(M, generator=torch.Generator().manual_seed(seed))[:num_dead]] = True
    return mask


def forward_and_grads(sae, ref, x):
    """forward of both with a random upstream gradient; compares outputs, parameter and input
    gradients."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_ref = sae(xa), ref(xb)
    close(out, out_ref)
    g = torch.randn_like(out_ref)
    out.backward(g)
    out_ref.backward(g)
    grads_close(sae, ref)
    close(xa.grad, xb.grad)


def encode_decode(sae, ref, x, foreign=True):
    """encode then decode as HookedSAETransformer runs them (decode reads the codes encode
    attached), gradients included; then decode of activations that are not ours (their
    non-zero entries, extracted)."""
    acts, acts_ref = sae.encode(x), ref.encode(x)
    assert acts.shape == acts_ref.shape == (*x.shape[:-1], M)
    close(acts, acts_ref)
    out, out_ref = sae.decode(acts), ref.decode(acts_ref)
    close(out, out_ref)
    g = torch.randn_like(out_ref)
    out.backward(g)
    out_ref.backward(g)
    grads_close(sae, ref)
    sae.zero_grad()
    ref.zero_grad()
    if foreign:
        close(sae.decode(acts_ref.detach()), ref.decode(acts_ref.detach()))
    return acts, acts_ref


def train_and_compare(sae, ref, step, rel=2e-5):
    out, out_ref = sae.training_forward_pass(step), ref.training_forward_pass(step)
    assert list(out.losses) == list(out_ref.losses)
    for name in out_ref.losses:
        close(out.losses[name], out_ref.losses[name], rel)
    close(out.loss, out_ref.loss, rel)
    close(out.sae_out, out_ref.sae_out, rel)
    assert out.feature_acts.is_sparse and out.hidden_pre is out.feature_acts
    close(out.feature_acts, out_ref.feature_acts, rel)
    out.loss.backward()
    out_ref.loss.backward()
    grads_close(sae, ref, rel)
    return out, out_ref


# ---------------------------------------------------------------------------------------------
# TopK


@pytest.mark.parametrize("rescale,apply_b_dec", [(False, True), (True, False)])
def test_topk_sae_encode_decode_forward(calls, rescale, apply_b_dec):
    cfg = TopKSAEConfig(d_in=D, d_sae=M, k=K, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply_b_dec)
    sae = randomize(TopKSAE(cfg))
    ref, handle = twin(sae)
    assert handle.patched == ["encode", "decode", "forward"]
    x = torch.randn(2, 3, D)  # leading batch dims
    acts, acts_ref = encode_decode(sae, ref, x)
    assert acts.layout == torch.strided
    assert ((acts_ref != 0).sum(-1) == K).all()  # every row has K positive pre-activations here
    forward_and_grads(sae, ref, x)
    assert calls["topk_encode"] == 2 and calls["sparse_decode_csr"] == 2 and calls["sparse_decode"] == 1


@pytest.mark.parametrize("num_dead", [None, 4, 30])
def test_topk_training_forward_pass(calls, num_dead):
    """MSE + AuxK (k_aux = d_in // 2 = 18: 4 dead latents scale it by 4/18, 30 do not), with
    SAELens's default rescale_acts_by_decoder_norm=True; every parameter's gradient."""
    sae = randomize(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, aux_loss_coefficient=0.7)))
    ref, handle = twin(sae)
    assert handle.patched == list(PATCHED)
    dead = None if num_dead is None else dead_mask(num_dead)
    out, out_ref = train_and_compare(sae, ref, step_input(torch.randn(10, D), dead))
    aux = out_ref.losses["auxiliary_reconstruction_loss"]
    assert (aux > 0) if num_dead else (aux == 0)
    assert calls["topk_encode"] == 1 and calls["sparse_decode"] == (2 if num_dead else 1)
    assert out.feature_acts.requires_grad  # TopK's sparse activations keep the graph


def test_topk_sparse_activations_encode_returns_coo(calls):
    """TopKTrainingSAE(use_sparse_activations=True): encode returns a COO tensor, as SAELens's."""
    cfg = TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, use_sparse_activations=True)
    sae = randomize(TopKTrainingSAE(cfg))
    ref, _ = twin(sae)
    x = torch.randn(2, 4, D)
    with torch.no_grad():
        acts, acts_ref = sae.encode(x), ref.encode(x)
        assert acts.is_sparse and acts_ref.is_sparse and acts.shape == acts_ref.shape == (2, 4, M)
        close(acts, acts_ref)
        close(sae.decode(acts), ref.decode(acts_ref))  # the codes encode attached to its COO
        close(sae.decode(acts_ref), ref.decode(acts_ref))  # another COO input: its entries
    assert calls["topk_encode"] == 1 and calls["sparse_decode_csr"] == 2


def test_topk_fewer_positive_than_k(calls):
    """Top-k then ReLU, as SAELens: a row with fewer than k positive pre-activations stores k
    entries, the clipped ones as zeros at the latents torch.topk picks (tie-free data)."""
    sae = randomize(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K)))
    with torch.no_grad():
        sae.b_enc.sub_(3.0)  # most pre-activations negative
    ref, _ = twin(sae)
    x = torch.randn(6, D)
    out, out_ref = train_and_compare(sae, ref, step_input(x))
    assert ((out_ref.feature_acts != 0).sum(-1) < K).any()
    fa = out.feature_acts.coalesce()
    assert fa._nnz() == 6 * K
    ours = {(int(r), int(c)) for r, c in fa.indices().T}
    top = out_ref.hidden_pre.topk(K, dim=-1).indices
    assert ours == {(r, int(c)) for r in range(6) for c in top[r]}


def test_topk_ties_keep_the_smaller_latent_id(calls):
    """A documented difference: with equal pre-activations at the k-th place the op keeps the
    smaller latent id; torch.topk's choice is unspecified. Everything else agrees."""
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K))
    b = torch.rand(M) * 4 - 1  # in [-1, 3)
    b[[3, 11, 20, 60]] = torch.tensor([10.0, 9.0, 8.0, 7.0])
    b[[7, 40]] = 5.0  # a tie for the fifth place
    with torch.no_grad():
        sae.W_enc.zero_()  # pre = b_enc exactly, for every row
        sae.b_enc.copy_(b)
    ref, _ = twin(sae)
    x = torch.randn(4, D)
    acts, acts_ref = sae.encode(x), ref.encode(x)
    assert (acts[:, 7] == 5).all() and (acts[:, 40] == 0).all()
    assert ((acts_ref[:, 7] == 5) ^ (acts_ref[:, 40] == 5)).all()
    keep = torch.ones(M, dtype=torch.bool)
    keep[[7, 40]] = False
    close(acts[:, keep], acts_ref[:, keep])
    assert calls["topk_encode"] == 1


# ---------------------------------------------------------------------------------------------
# BatchTopK


@pytest.mark.parametrize("num_dead,k", [(0, 4.0), (6, 4.0), (40, 4.0), (0, 2.5), (6, 3.7)])
def test_batchtopk_training(calls, num_dead, k):
    """encode / forward / training pass; AuxK over few dead latents (a dense GEMM over their
    columns) and many (the fused TopK op's dead selection); the running threshold update; a
    fractional k (SAELens keeps int(k·N) of the batch: 12 rows at k = 2.5 keep 30, at 3.7 44)."""
    cfg = BatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=k, topk_threshold_lr=0.5)
    sae = randomize(BatchTopKTrainingSAE(cfg))
    ref, handle = twin(sae)
    assert handle.patched == list(PATCHED)
    x = torch.randn(3, 4, D)
    encode_decode(sae, ref, x)
    forward_and_grads(sae, ref, x)
    sae.zero_grad()
    ref.zero_grad()
    dead = dead_mask(num_dead) if num_dead else None
    out, out_ref = train_and_compare(sae, ref, step_input(x.reshape(-1, D), dead))
    assert (out_ref.losses["auxiliary_reconstruction_loss"] > 0) == bool(num_dead)
    assert sae.topk_threshold.item() > 0
    close(sae.topk_threshold, ref.topk_threshold, 1e-6)
    assert out.metrics["topk_threshold"] is sae.topk_threshold
    assert calls["batchtopk_encode"] == 3 and calls["topk_encode"] == (1 if num_dead == 40 else 0)


def test_batchtopk_does_not_store_zeros(calls):
    """A documented difference: with fewer than k·N positive activations SAELens writes zeros
    among its k·N entries; the op stores only positive ones. The dense activations agree."""
    sae = randomize(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=K)))
    with torch.no_grad():
        sae.b_enc.sub_(3.0)
    ref, _ = twin(sae)
    out, out_ref = train_and_compare(sae, ref, step_input(torch.randn(6, D)))
    assert (out_ref.feature_acts != 0).sum() < 6 * K
    assert out.feature_acts.coalesce()._nnz() == (out_ref.feature_acts != 0).sum()


# ---------------------------------------------------------------------------------------------
# JumpReLU


def test_jumprelu_sae_encode_decode_forward(calls):
    sae = randomize(JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=M)))
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(M))
    ref, handle = twin(sae)
    assert handle.patched == ["encode", "decode", "forward"]
    x = torch.randn(2, 5, D)
    acts, acts_ref = encode_decode(sae, ref, x)
    assert (acts_ref != 0).any() and (acts_ref == 0).any()
    forward_and_grads(sae, ref, x)  # the threshold gets no gradient in SAELens's inference SAE
    assert calls["jumprelu_encode"] == 2 and calls["sparse_decode_csr"] == 3


def near_threshold_sae(seed=0, **cfg):
    """A JumpReLUTrainingSAE and a batch where many pre-activations lie within the bandwidth of
    their threshold (on both sides), so the straight-through threshold gradients are exercised."""
    sae = randomize(JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D, d_sae=M, **cfg)), seed)
    x = torch.randn(10, D)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        half = sae.bandwidth / 2
        offset = (0.1 + 0.8 * torch.rand(M, generator=g)) * half * torch.where(torch.rand(M, generator=g) < 0.5, -1, 1)
        theta = pre.max(0).values + offset  # the largest entry of each latent sits near its threshold
        theta[M // 2:] = 0.5 * torch.rand(M - M // 2, generator=g)
        sae.threshold.copy_(theta.clamp(min=0.001))
        band = (pre - sae.threshold).abs() < half
        assert band.sum() >= 20 and (band & (pre > sae.threshold)).any() and (band & (pre <= sae.threshold)).any()
    return sae, x


@pytest.mark.parametrize("pre_act", [None, 0.05])
def test_jumprelu_training_forward_pass(calls, pre_act):
    """MSE + L0 ("step", bandwidth 0.05) + pre_act_loss on dead latents; gradients of every
    parameter, the threshold's straight-through ones included."""
    sae, x = near_threshold_sae(l0_coefficient=0.3, pre_act_loss_coefficient=pre_act)
    ref, handle = twin(sae)
    assert handle.patched == list(PATCHED)
    out, out_ref = train_and_compare(sae, ref, step_input(x, dead_mask(20), {"l0": 0.3}))
    assert set(out.losses) == ({"mse_loss", "l0_loss"} | ({"pre_act_loss"} if pre_act else set()))
    assert ref.threshold.grad.count_nonzero() >= 10
    if pre_act:
        assert out_ref.losses["pre_act_loss"] > 0
    assert calls["jumprelu_training_forward"] == 1 and not calls["jumprelu_encode"]


def test_jumprelu_training_sae_forward_and_encode(calls):
    """forward: the fused training op, with the threshold's straight-through gradient; encode
    under no_grad: the fast encoder; encode with autograd on: SAELens's (documented fallback)."""
    sae, x = near_threshold_sae(seed=3)
    ref, _ = twin(sae)
    forward_and_grads(sae, ref, x)
    assert ref.threshold.grad.count_nonzero() >= 10
    assert calls["jumprelu_training_forward"] == 1
    with torch.no_grad():
        close(sae.encode(x), ref.encode(x))
    assert calls["jumprelu_encode"] == 1
    close(sae.encode(x), ref.encode(x))
    assert calls["jumprelu_encode"] == 1


def test_jumprelu_training_fallbacks(calls):
    """Documented fallbacks: a negative threshold in encode (SAELens's training JumpReLU has no
    ReLU), the "quadratic" and "tanh" sparsity losses (warned at accelerate time)."""
    sae, x = near_threshold_sae()
    with torch.no_grad():
        sae.threshold[:5] = -0.5
    ref, _ = twin(sae)
    with torch.no_grad():
        acts, acts_ref = sae.encode(x), ref.encode(x)
    assert (acts_ref < 0).any()
    close(acts, acts_ref)
    assert not calls["jumprelu_encode"]

    for mode, extra in (("quadratic", {"target_l0": 3.0}), ("tanh", {})):
        sae, x = near_threshold_sae(jumprelu_sparsity_loss_mode=mode, **extra)
        ref = copy.deepcopy(sae)
        with pytest.warns(UserWarning, match=f"jumprelu_sparsity_loss_mode='{mode}'"):
            handle = accelerate(sae, backend=REF)
        assert "training_forward_pass" in handle.patched
        train_and_compare_dense(sae, ref, step_input(x, None, {"l0": 0.2}))
    assert not calls["jumprelu_training_forward"]


def train_and_compare_dense(sae, ref, step):
    out, out_ref = sae.training_forward_pass(step), ref.training_forward_pass(step)
    for name in out_ref.losses:
        close(out.losses[name], out_ref.losses[name])
    out.loss.backward()
    out_ref.loss.backward()
    grads_close(sae, ref)


# ---------------------------------------------------------------------------------------------
# Hooks, error term, normalisation, leading dims


def test_hooks_fall_back_to_saelens(calls):
    """With a hook on any hook point the call runs SAELens's own method (the hook sees its exact
    dense tensor); once the hooks are removed the fast path runs again."""
    sae = randomize(TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K)))
    ref, _ = twin(sae)
    x = torch.randn(4, D)
    seen = []

    def double(acts, hook):
        seen.append(acts.shape)
        return acts * 2

    for s in (sae, ref):
        s.hook_sae_acts_post.add_hook(double)
    close(sae(x), ref(x))
    close(sae.encode(x), ref.encode(x))
    assert len(seen) == 4 and not sum(calls.values())
    for s in (sae, ref):
        s.reset_hooks()
    close(sae(x), ref(x))
    assert calls["topk_encode"] == 1 and len(seen) == 4


def test_use_error_term(calls):
    """use_error_term: forward returns sae_out + (x - clean reconstruction), the error carrying
    no gradient; with a hook editing the activations the fallback keeps SAELens's meaning."""
    sae = randomize(TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sae.use_error_term = True
    ref, _ = twin(sae)
    x = torch.randn(3, D)
    forward_and_grads(sae, ref, x)
    assert calls["topk_encode"] == 1
    for s in (sae, ref):
        s.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 0)
    out = sae(x)
    close(out, ref(x))
    assert not torch.allclose(out, x, atol=1e-4)  # the edited reconstruction plus the clean error
    # the hooked encode / decode ran SAELens's code; the error term's hook-free recomputation
    # (inside SAELens's _disable_hooks) ran fast
    assert calls["topk_encode"] == 2 and calls["sparse_decode_csr"] == 1


def test_hook_z_reshaping(calls):
    """reshape_activations="hook_z": [..., n_heads, d_head] in and out, through the SAE's own
    reshape functions."""
    sae = randomize(TopKSAE(TopKSAEConfig(d_in=36, d_sae=M, k=K, reshape_activations="hook_z")))
    ref = rebuilt_twin(sae)
    x = torch.randn(2, 3, 4, 9)
    forward_and_grads(sae, ref, x)
    with torch.no_grad():
        close(sae.decode(sae.encode(x)), ref.decode(ref.encode(x)))
    assert calls["topk_encode"] == 2 and sae(x).shape == x.shape


def test_layer_norm_activation_normalisation(calls):
    """normalize_activations runs through the SAE's own run_time_activation_norm_fn_in/out."""
    cfg = TopKSAEConfig(d_in=D, d_sae=M, k=K, normalize_activations="layer_norm")
    sae = randomize(TopKSAE(cfg))
    ref = rebuilt_twin(sae)
    x = 3 + 2 * torch.randn(2, 3, D)
    encode_decode(sae, ref, x, foreign=False)  # (layer_norm's decode consumes the statistics its encode stored)
    forward_and_grads(sae, ref, x)
    assert calls["topk_encode"] == 2 and calls["sparse_decode_csr"] == 1


# ---------------------------------------------------------------------------------------------
# Handle, unsupported architectures, parameters and saving


def test_undo_and_context_manager(calls):
    sae = randomize(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K)))
    params = {n: p for n, p in sae.named_parameters()}
    x = torch.randn(3, D)
    handle = accelerate(sae, backend=REF)
    assert handle.active and all(name in sae.__dict__ for name in PATCHED)
    assert {n: p for n, p in sae.named_parameters()} == params  # the same tensors, not copies
    assert "Acceleration(sae_lens TopKTrainingSAE" in repr(handle)
    sae(x)
    assert calls["topk_encode"] == 1
    handle.undo()
    assert not handle.active and handle.patched == []
    assert not any(name in sae.__dict__ for name in PATCHED)
    assert sae.encode.__func__ is TopKTrainingSAE.encode and sae.forward.__func__ is TopKTrainingSAE.forward
    sae(x)
    assert calls["topk_encode"] == 1
    with sae_fast.integrations.accelerate(sae, backend=REF) as h:
        assert h.active and h.library == "sae_lens"
        sae(x)
        assert calls["topk_encode"] == 2
    assert not any(name in sae.__dict__ for name in PATCHED)
    sae(x)
    assert calls["topk_encode"] == 2


def test_accelerating_twice_warns():
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K))
    first = accelerate(sae, backend=REF)
    with pytest.warns(UserWarning, match="already accelerated"):
        second = accelerate(sae, backend=REF)
    assert second.patched == [] and first.active
    first.undo()
    with pytest.raises(ValueError, match="backend"):
        accelerate(sae, backend="gpu")


@pytest.mark.parametrize("make", [
    lambda: StandardSAE(StandardSAEConfig(d_in=D, d_sae=M)),
    lambda: GatedSAE(GatedSAEConfig(d_in=D, d_sae=M)),
    lambda: AbsTopKSAE(AbsTopKSAEConfig(d_in=D, d_sae=M, k=K)),
    lambda: MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D, d_sae=M, k=K, matryoshka_widths=[20, M])),
], ids=["standard", "gated", "abstopk", "matryoshka"])
def test_unsupported_architecture_warns_and_is_unchanged(calls, make):
    sae = make()
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    with pytest.warns(UserWarning, match="left unaccelerated"):
        handle = accelerate(sae)
    assert handle.patched == [] and not handle.active and "not accelerated" in repr(handle)
    assert not any(name in sae.__dict__ for name in PATCHED)
    x = torch.randn(3, D)
    with torch.no_grad():
        sae(x)
    assert not sum(calls.values())
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in state.items())
    handle.undo()


def test_save_model_while_accelerated(tmp_path, calls):
    sae = randomize(JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=M)))
    handle = accelerate(sae, backend=REF)
    sae.save_model(tmp_path / "sae")
    loaded = JumpReLUSAE.load_from_disk(tmp_path / "sae")
    assert loaded.state_dict().keys() == sae.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sae.state_dict().items())
    handle.undo()


def test_decode_of_activations_requiring_grad_uses_saelens(calls):
    """Gradients with respect to the activations reach every latent in SAELens (attribution):
    when that gradient is observable (a leaf, a retained gradient, an in-place edit after
    encode) decode runs SAELens's dense code."""
    sae = randomize(TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K, rescale_acts_by_decoder_norm=True)))
    ref, _ = twin(sae)
    x = torch.randn(3, D)
    acts = ref.encode(x).detach()
    a, b = acts.clone().requires_grad_(), acts.clone().requires_grad_()
    sae.decode(a).sum().backward()
    ref.decode(b).sum().backward()
    assert (a.grad[acts == 0] != 0).all()
    close(a.grad, b.grad)
    ours, theirs = sae.encode(x), ref.encode(x)
    for t in (ours, theirs):
        t.retain_grad()
    sae.decode(ours).sum().backward()
    ref.decode(theirs).sum().backward()
    close(ours.grad, theirs.grad)
    edited = sae.encode(x)
    edited[:, 0] += 1.0  # an in-place edit: the attached codes no longer describe the tensor
    reference = acts.clone()
    reference[:, 0] += 1.0
    close(sae.decode(edited), ref.decode(reference))  # SAELens's dense decode (edited needs grad)
    assert calls["topk_encode"] == 2 and calls["sparse_decode_csr"] == 0
    with torch.no_grad():  # no gradient needed: its non-zero entries, extracted
        close(sae.decode(edited), ref.decode(reference))
    assert calls["sparse_decode_csr"] == 1


def test_decode_sees_every_edit_and_every_mode():
    """The activations an accelerated encode returned, then: made a leaf requiring grad after a
    no-grad encode (attribution: the gradient must reach it), edited through ``.data`` or
    ``.numpy()`` (no version bump), or computed under ``inference_mode`` (no version counter).
    Each decode is SAELens's, gradients included."""
    for make in (lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K)),
                 lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=M))):
        sae = randomize(make())
        ref, _ = twin(sae)
        x = torch.randn(4, D)
        with torch.no_grad():
            ours, theirs = sae.encode(x), ref.encode(x)
        ours.requires_grad_()
        theirs.requires_grad_()
        sae.decode(ours).pow(2).sum().backward()
        ref.decode(theirs).pow(2).sum().backward()
        assert ours.grad is not None and (ours.grad != 0).sum() > (ours != 0).sum()  # every latent, as SAELens
        close(ours.grad, theirs.grad)
        for edit in (lambda t: t.data.zero_(), lambda t: t.data.__setitem__((slice(None), 3), 2.0),
                     lambda t: t.numpy().__setitem__((slice(None), 5), 1.5)):
            with torch.no_grad():
                ours, theirs = sae.encode(x), ref.encode(x)
                edit(ours)
                edit(theirs)
                close(sae.decode(ours), ref.decode(theirs))
        with torch.inference_mode():
            ours, theirs = sae.encode(x), ref.encode(x)
            close(ours, theirs)
            close(sae.decode(ours), ref.decode(theirs))


# ---------------------------------------------------------------------------------------------
# SAELens's trainer


def test_sae_trainer_runs_on_accelerated_sae(calls):
    """SAETrainer.fit for a few steps, dead latents (window 1) switching AuxK on: the same
    parameters, firing statistics and logged metrics as training SAELens's own SAE."""
    sae = randomize(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K)))
    ref, _ = twin(sae)
    batches = [torch.randn(8, D) for _ in range(5)]
    tcfg = SAETrainerConfig(total_training_samples=32, train_batch_size_samples=8, lr=1e-3, lr_end=1e-3,
                            dead_feature_window=1)
    trainers = [SAETrainer(cfg=tcfg, sae=s, data_provider=iter(batches)) for s in (sae, ref)]
    for trainer in trainers:
        trainer.fit()
    ours, theirs = trainers
    assert calls["topk_encode"] == 4 and calls["sparse_decode"] >= 5  # AuxK decodes from the third step
    assert ours.dead_neurons.any()
    assert torch.equal(ours.n_forward_passes_since_fired, theirs.n_forward_passes_since_fired)
    assert torch.equal(ours.act_freq_scores, theirs.act_freq_scores)
    for (name, p), (_, q) in zip(sae.named_parameters(), ref.named_parameters()):
        close(p, q, 1e-4)
    logs = [t.build_train_step_log_dict(t.step(batches[4]), 40) for t in trainers]
    for key in ("metrics/l0", "losses/mse_loss", "losses/auxiliary_reconstruction_loss", "metrics/explained_variance"):
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-4, abs=1e-6), key


# ---------------------------------------------------------------------------------------------
# The default backend: the Triton kernels (under the interpreter on CPU)


def test_default_backend_topk_training(calls):
    """TopK encode and training pass (no dead latents: AuxK's dead-latent selection costs tens of
    seconds under the interpreter, see the slow test)."""
    sae = randomize(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K)))
    ref, _ = twin(sae, backend=None)
    x = torch.randn(6, D)
    with torch.no_grad():
        close(sae.encode(x), ref.encode(x))
    train_and_compare(sae, ref, step_input(x), rel=1e-4)
    assert calls["topk_encode"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["topk-auxk", "jumprelu", "batchtopk"])
def test_default_backend_training_slow(calls, kind):
    if kind == "jumprelu":
        sae, x = near_threshold_sae(pre_act_loss_coefficient=0.1)
        step = step_input(x, dead_mask(20), {"l0": 0.3})
    else:
        cls, cfg_cls = (TopKTrainingSAE, TopKTrainingSAEConfig) if kind == "topk-auxk" else (
            BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)
        sae = randomize(cls(cfg_cls(d_in=D, d_sae=M, k=K)))
        step = step_input(torch.randn(6, D), dead_mask(40))
    ref, _ = twin(sae, backend=None)
    train_and_compare(sae, ref, step, rel=1e-4)
    op = {"topk-auxk": "topk_encode", "jumprelu": "jumprelu_training_forward", "batchtopk": "batchtopk_encode"}[kind]
    assert calls[op] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu"])
def test_default_backend_gpu_training(kind):
    """The GPU kernels through the adapter on CUDA tensors. The encoder is scaled down so the
    biases (spread 0.05 apart) decide the selection: tf32 rounding in the fused GEMM cannot
    flip it, and the tolerance covers tf32."""
    if kind == "jumprelu":
        sae, x = near_threshold_sae(pre_act_loss_coefficient=0.1)
        coefficients = {"l0": 0.3}
    else:
        cls, cfg_cls = (TopKTrainingSAE, TopKTrainingSAEConfig) if kind == "topk" else (
            BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)
        sae = randomize(cls(cfg_cls(d_in=D, d_sae=M, k=K)))
        with torch.no_grad():
            sae.W_enc.mul_(1e-3)
            sae.b_enc.copy_(torch.randperm(M) * 0.05 - 1)
        x, coefficients = torch.randn(16, D), {}
    sae = sae.to("cuda")
    ref, _ = twin(sae, backend=None)
    train_and_compare(sae, ref, step_input(x.cuda(), dead_mask(30).cuda(), coefficients), rel=2e-3)
