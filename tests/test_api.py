"""Validation errors, backend dispatch, and packaging of the public API."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastppo
from fastppo import _dispatch, reference
from fastppo.kernels import KERNEL_OPS


def tok(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


MASK = torch.ones(2, 3, dtype=torch.bool)
LOGITS = torch.zeros(2, 3, 5)
LABELS = torch.zeros(2, 3, dtype=torch.long)

# (callable, message fragment that must appear). Each entry breaks exactly one rule.
BAD_CALLS = [
    # log-probs
    (lambda op: op.logprobs_from_logits(torch.zeros(5), torch.zeros(1, dtype=torch.long)), "[B, T, V] or [N, V]"),
    (lambda op: op.logprobs_from_logits(LOGITS, torch.zeros(2, 4, dtype=torch.long)), "labels of shape [2, 3]"),
    (lambda op: op.logprobs_from_logits(LOGITS, LABELS.float()), "labels must be an integer tensor"),
    (lambda op: op.logprobs_from_logits(LOGITS.long(), LABELS), "logits must be a floating tensor"),
    (lambda op: op.logprobs_from_logits(LOGITS, LABELS + 5), "labels must lie in [0, 5)"),
    (lambda op: op.logprobs_from_logits(LOGITS, LABELS - 1), "got values from -1 to -1"),
    (lambda op: op.logprobs_from_logits(LOGITS, LABELS, temperature=0.0), "temperature must be > 0.0"),
    (lambda op: op.logprobs_from_logits(LOGITS, LABELS, temperature=-1), "temperature must be > 0.0"),
    (lambda op: op.logprobs_from_logits(LOGITS, LABELS, temperature=float("nan")), "temperature must be finite"),
    (lambda op: op.logprobs_from_logits(LOGITS, LABELS, mask=torch.ones(2, 4, dtype=torch.bool)), "mask has shape [2, 4]"),
    (lambda op: op.logprobs_from_logits(LOGITS, LABELS, return_entropy="yes"), "return_entropy must be True or False"),
    (lambda op: op.logprobs_from_logits(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long)), "V >= 1"),
    (lambda op: op.logprobs_from_logits([[0.0]], LABELS), "logits must be a torch.Tensor"),
    (lambda op: op.entropy_from_logits(torch.zeros(2, 3, 4, 5)), "[B, T, V] or [N, V]"),
    (lambda op: op.entropy_from_logits(LOGITS, temperature=0), "temperature must be > 0.0"),
    # KL and shaping
    (lambda op: op.kl_penalty(tok(2, 3), tok(2, 3), "k4"), "unknown KL estimator 'k4'; expected one of k1, abs, k2, k3"),
    (lambda op: op.kl_penalty(tok(2, 3), tok(2, 4)), "ref_logprobs has shape [2, 4] but logprobs has [2, 3]"),
    (lambda op: op.kl_penalty(tok(2, 3), tok(2, 3, dtype=torch.bfloat16)), "ref_logprobs has dtype torch.bfloat16"),
    (lambda op: op.kl_penalty(tok(2, 3), tok(2, 3), clamp=-1.0), "clamp must be > 0.0"),
    (lambda op: op.shape_rewards(tok(3), tok(2, 3), tok(2, 3), MASK, kl_coef=0.1), "scores must be [B] = [2]"),
    (lambda op: op.shape_rewards(tok(2), tok(2, 3), tok(2, 3), MASK, kl_coef=0.1, estimator="kl"), "unknown KL estimator 'kl'"),
    (lambda op: op.shape_rewards(tok(2), tok(2, 3), tok(2, 3), MASK, kl_coef=float("inf")), "kl_coef must be finite"),
    (lambda op: op.shape_rewards(tok(2), tok(6), tok(6), MASK, kl_coef=0.1), "logprobs must be [B, T] (2-D)"),
    # GAE and whitening
    (lambda op: op.gae(tok(2, 3), tok(2, 3), MASK, gamma=1.5), "gamma must be <= 1.0"),
    (lambda op: op.gae(tok(2, 3), tok(2, 3), MASK, lam=-0.1), "lam must be >= 0.0"),
    (lambda op: op.gae(tok(2, 3), tok(3, 3), MASK), "values has shape [3, 3] but rewards has [2, 3]"),
    (lambda op: op.gae(tok(2, 3), tok(2, 3), torch.ones(3, 2)), "mask has shape [3, 2] but rewards has [2, 3]"),
    (lambda op: op.gae(tok(2, 3), tok(2, 3, dtype=torch.float16), MASK), "values has dtype torch.float16"),
    (lambda op: op.gae(tok(2, 3), tok(2, 3), MASK, whiten=1), "whiten must be True or False"),
    (lambda op: op.masked_whiten(tok(2, 3), MASK, eps=-1.0), "eps must be > 0.0"),
    (lambda op: op.masked_whiten(tok(2, 3), MASK, eps=0.0), "eps must be > 0.0"),
    (lambda op: op.masked_whiten(tok(2, 3).long(), MASK), "x must be a floating tensor"),
    # losses
    (lambda op: op.policy_loss(tok(2, 3), tok(2, 3), tok(2, 3), MASK, agg="mean"), "unknown aggregation (agg) 'mean'"),
    (lambda op: op.policy_loss(tok(2, 3), tok(2, 3), tok(2, 3), MASK, clip_low=-0.1), "clip_low must be >= 0.0"),
    (lambda op: op.policy_loss(tok(2, 3), tok(2, 3), tok(2, 3), MASK, dual_clip=1.0), "dual_clip must be > 1.0"),
    (lambda op: op.policy_loss(tok(2, 3), tok(2, 3), tok(2, 3), MASK, is_weights=tok(2, 2)), "is_weights has shape [2, 2]"),
    (lambda op: op.policy_loss(tok(2, 3), tok(2, 3), tok(2, 3, dtype=torch.float16), MASK), "advantages has dtype"),
    (lambda op: op.value_loss(tok(2, 3), tok(2, 3), tok(2, 3), MASK, clip=-0.5), "clip must be >= 0.0"),
    (lambda op: op.value_loss(tok(2, 3), tok(2, 3), tok(2, 3), MASK, agg="sum"), "unknown aggregation (agg) 'sum'"),
    (lambda op: op.aggregate(tok(2, 3), MASK, "token_mean"), "expected one of token-mean, token-sum"),
    (lambda op: op.ppo_loss(*(tok(2, 3),) * 6, MASK, entropy=tok(2, 4)), "entropy has shape [2, 4]"),
    (lambda op: op.ppo_loss(*(tok(2, 3),) * 6, MASK, vf_coef="half"), "vf_coef must be a real number"),
    (lambda op: op.compute_advantages(tok(2), tok(2, 3), tok(2, 3), tok(2, 4), MASK, kl_coef=0.1), "values has shape [2, 4]"),
]


@pytest.mark.parametrize("module", [fastppo, reference], ids=["fastppo", "reference"])
@pytest.mark.parametrize("call, fragment", BAD_CALLS, ids=[f"bad{i}" for i in range(len(BAD_CALLS))])
def test_bad_input_raises_value_error_naming_the_problem(module, call, fragment):
    with pytest.raises(ValueError) as info:
        call(module)
    assert fragment in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mismatched_devices_raise():
    with pytest.raises(ValueError, match="all inputs must be on one device"):
        fastppo.kl_penalty(tok(2, 3), tok(2, 3).cuda())


def test_mismatched_devices_raise_on_meta():
    # The meta device stands in for a second device on a machine without a GPU.
    with pytest.raises(ValueError, match="ref_logprobs is on meta but logprobs is on cpu"):
        fastppo.kl_penalty(tok(2, 3), tok(2, 3).to("meta"))


def test_labels_at_masked_positions_are_not_checked():
    labels = LABELS.clone()
    labels[0, 0] = -100
    mask = MASK.clone()
    mask[0, 0] = False
    out = fastppo.logprobs_from_logits(LOGITS, labels, mask=mask)
    assert out[0, 0] == 0


def test_value_checks_can_be_switched_off(monkeypatch):
    # Without the check nothing reads the labels on the host; the range is then the caller's job.
    monkeypatch.setenv("FASTPPO_VALUE_CHECKS", "0")
    from fastppo import _checks

    _checks.logprobs_from_logits(LOGITS, LABELS + 5)  # no error, no device-to-host copy


def test_masked_positions_never_produce_nan():
    nan = torch.full((2, 3), float("nan"))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    x = torch.where(mask, torch.ones(2, 3), nan)
    adv, ret = fastppo.gae(x, x, mask)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    rewards, kl = fastppo.shape_rewards(torch.ones(2), x, x, mask, kl_coef=0.1)
    assert torch.isfinite(rewards).all() and torch.isfinite(kl).all()
    loss, stats = fastppo.policy_loss(x, x, x, mask)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    loss, _ = fastppo.value_loss(x, x, x, mask)
    assert torch.isfinite(loss)
    assert torch.isfinite(fastppo.masked_whiten(x, mask)[mask]).all()


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def test_torch_backend_uses_the_reference(monkeypatch):
    monkeypatch.setenv("FASTPPO_BACKEND", "torch")
    assert fastppo.current_backend() == "torch"
    assert _dispatch.pick("gae", torch.device("cpu")) is reference.gae.raw


def test_auto_backend_uses_the_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("FASTPPO_BACKEND", "auto")
    for op in ("gae", "policy_loss", "logprobs_from_logits"):
        assert _dispatch.pick(op, torch.device("cpu")) is getattr(reference, op).raw


def test_auto_backend_picks_the_kernel_for_cuda_tensors(monkeypatch):
    monkeypatch.setenv("FASTPPO_BACKEND", "auto")
    monkeypatch.setitem(KERNEL_OPS, "gae", "_common:output_dtype")  # any importable function stands in
    from fastppo.kernels._common import output_dtype

    assert _dispatch.pick("gae", torch.device("cuda")) is output_dtype
    monkeypatch.delitem(KERNEL_OPS, "gae")
    assert _dispatch.pick("gae", torch.device("cuda")) is reference.gae.raw


def test_triton_backend_without_a_kernel_names_the_op(monkeypatch):
    monkeypatch.delitem(KERNEL_OPS, "value_loss", raising=False)
    with fastppo.use_backend("triton"), pytest.raises(NotImplementedError, match=r"fastppo.value_loss has no Triton kernel"):
        fastppo.value_loss(tok(2, 3), tok(2, 3), tok(2, 3), MASK)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setitem(KERNEL_OPS, "gae", "_common:output_dtype")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastppo.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastppo.gae(tok(2, 3), tok(2, 3), MASK)


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("FASTPPO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown FASTPPO_BACKEND 'cuda'; expected one of auto, triton, torch"):
        fastppo.gae(tok(2, 3), tok(2, 3), MASK)
    with pytest.raises(ValueError, match="unknown backend"):
        with fastppo.use_backend("jax"):
            pass


def test_use_backend_nests_and_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("FASTPPO_BACKEND", "triton")
    with fastppo.use_backend("torch"):
        assert fastppo.current_backend() == "torch"
        with fastppo.use_backend("auto"):
            assert fastppo.current_backend() == "auto"
        assert fastppo.current_backend() == "torch"
    assert fastppo.current_backend() == "triton"


def test_every_public_op_has_a_reference_with_the_same_signature():
    import inspect

    for name in ("logprobs_from_logits", "entropy_from_logits", "kl_penalty", "shape_rewards", "gae", "masked_whiten",
                 "policy_loss", "value_loss", "aggregate", "compute_advantages", "ppo_loss"):
        public = inspect.signature(getattr(fastppo, name))
        ref = inspect.signature(getattr(reference, name).raw)
        assert list(public.parameters) == list(ref.parameters), name
        for p in public.parameters.values():
            assert p.default == ref.parameters[p.name].default, (name, p.name)
            assert p.kind == ref.parameters[p.name].kind, (name, p.name)


def test_every_registered_kernel_has_the_reference_signature():
    import inspect

    if not _dispatch.interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("importing kernels needs the interpreter or a GPU")
    for op in KERNEL_OPS:
        kernel = _dispatch.load_kernel(op)
        assert list(inspect.signature(kernel).parameters) == list(inspect.signature(getattr(reference, op).raw).parameters), op


def test_importing_fastppo_does_not_import_triton():
    code = "import sys, fastppo; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr


def test_importing_the_trainer_does_not_import_triton_or_a_kernel():
    """``fastppo.train`` and ``PPOTrainer`` import no Triton and no kernel module: Triton comes in
    only when a kernel runs (or, on its own, through torch._dynamo once transformers loads a
    model, which fastppo does not control; benchmarks/NOTES.md measures it)."""
    code = ("import sys, fastppo, fastppo.train; from fastppo.train import PPOTrainer; "
            "bad = sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'fastppo.kernels'))); "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr
