"""fastppo under torch.compile: every public op is a custom op ``fastppo::<op>`` (fastppo._library).

* ``torch.library.opcheck`` on every forward op and every backward op (schema, fake tensors,
  autograd registration, AOT dispatch), on the reference backend and on the Triton backend
  (through the interpreter on CPU);
* the custom-op path gives the eager op's numbers, forward and backward, masked garbage included;
* the logits ops compiled (aot_eager) give eager's gradients from their saved row statistics
  (NaN / inf at masked rows, NaN at a valid position, -inf logits, temperature, entropy or not,
  float64, bf16), and their backward never runs the forward again;
* ``torch._dynamo.explain`` sees one graph and no graph break for each public op;
* a small training step compiled with ``fullgraph=True`` (inductor) matches eager, and so do the
  fused-head step, rollout ops (no gradient) and ``dynamic=True`` shapes (aot_eager);
* B = 0 and strided bf16 inputs pass opcheck;
* bad labels still raise ValueError eagerly on both backends, and under compile are clamped.

Compilation is slow on a small CPU: the compile tests are few and tiny, and all but the inductor
training step use the ``aot_eager`` backend (AOT autograd with the fake and backward ops, no
code generation).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import _library
from fastppo import groundtruth as gt
from fastppo.testing import TOL, assert_close

B, T, V, H = 3, 5, 11, 6


def _rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def _data(gen):
    """Fresh inputs; masked positions (and masked logits / hidden rows) hold NaN and inf."""
    mask = torch.rand(B, T, generator=gen) > 0.35
    mask[0, :2] = True
    mask[1] = False  # a row with no valid token
    mask[2, -1] = False
    d = dict(
        mask=mask,
        logits=_rand(gen, B, T, V, scale=3.0),
        labels=torch.randint(0, V, (B, T), generator=gen),
        lp=_rand(gen, B, T) - 2.0,
        old=_rand(gen, B, T) - 2.0,
        ref=_rand(gen, B, T) - 2.0,
        adv=_rand(gen, B, T),
        values=_rand(gen, B, T),
        old_values=_rand(gen, B, T),
        returns=_rand(gen, B, T),
        weights=torch.rand(B, T, generator=gen) + 0.5,
        entropy=torch.rand(B, T, generator=gen) * 2.0,
        scores=_rand(gen, B),
        hidden=_rand(gen, B, T, H),
        weight=_rand(gen, V, H),
        bias=_rand(gen, V),
    )
    bad = ~mask
    for name in ("lp", "old", "ref", "adv", "values", "old_values", "returns", "weights", "entropy"):
        d[name] = d[name].masked_fill(bad, math.nan)
    d["logits"] = d["logits"].masked_fill(bad.unsqueeze(-1), math.inf)
    d["hidden"] = d["hidden"].masked_fill(bad.unsqueeze(-1), math.nan)
    d["labels"] = d["labels"].masked_fill(bad, 10**6)  # never read at masked positions
    return d


def _clean(t):
    """For an op without a mask: NaN in, NaN out (and opcheck does not compare NaN as equal)."""
    return t.nan_to_num(nan=0.5, posinf=1.0)


def _op_args(d):
    """Arguments of each ``fastppo::<op>``, in the op's own (positional) order."""
    m = d["mask"]
    return {
        "logprobs_from_logits": [(d["logits"], d["labels"], m, 1.3, True), (_clean(d["logits"]), d["labels"].clamp(0, V - 1), None, 1.0, False)],
        "entropy_from_logits": [(_clean(d["logits"]), 0.7)],
        "kl_penalty": [(_clean(d["lp"]), _clean(d["ref"]), "k3", None), (_clean(d["lp"]), _clean(d["ref"]), "k2", 1.0)],
        "shape_rewards": [(d["scores"], d["lp"], d["ref"], m, 0.1, "k1")],
        "gae": [(d["returns"], d["values"], m, 0.9, 0.8, True)],
        "masked_whiten": [(d["adv"], m, False, 1e-8)],
        "aggregate": [(d["lp"], m, "seq-mean-token-mean"), (d["lp"], m, "token-sum")],
        "policy_loss": [
            (d["lp"], d["old"], d["adv"], m, 0.2, 0.28, 3.0, "token-mean", d["weights"]),
            (d["lp"], d["old"], d["adv"], m, 0.2, None, None, "seq-mean-token-sum-norm", None),
        ],
        "value_loss": [(d["values"], d["old_values"], d["returns"], m, 0.2, "token-mean"),
                       (d["values"], d["old_values"], d["returns"], m, None, "seq-mean-token-sum")],
        "compute_advantages": [(d["scores"], d["lp"], d["ref"], d["values"], m, 0.1, "k3", 1.0, 0.95, True)],
        "ppo_loss": [(d["lp"], d["old"], d["adv"], d["values"], d["old_values"], d["returns"], m, d["entropy"],
                      0.2, None, 2.0, 0.2, 0.5, 0.01, "token-mean", None)],
        "linear_logprobs": [(d["hidden"], d["weight"], d["labels"], d["bias"], m, 1.0, True, 4),
                            (_clean(d["hidden"]), d["weight"], d["labels"].clamp(0, V - 1), None, None, 0.8, False, None)],
        "group_advantages": [(d["scores"][:2].repeat(2), 2, torch.ones(4, 3), "grpo", True, 1e-6)],
        "reinforce_pp_advantages": [(d["returns"], m, 1.0)],
        "gspo_loss": [(d["lp"], d["old"], d["adv"], m, "seq-mean-token-mean", d["weights"], 0.2, 0.28, None, False),
                      (d["lp"], d["old"], d["adv"], m, "token-sum", None, 0.2, None, 3.0, True)],
        "geo_mean_loss": [(d["lp"], d["old"], d["adv"], m, "seq-mean-token-mean", d["weights"], 0.2, 0.28),
                          (d["lp"], d["old"], d["adv"], m, "token-mean", None, 0.3, None)],
    }


def _public_calls(d):
    """(op name, args, kwargs, differentiable arguments: positions or keyword names) in public form."""
    m = d["mask"]
    return [
        ("logprobs_from_logits", (d["logits"], d["labels"]), dict(temperature=1.3, return_entropy=True, mask=m), (0,)),
        ("entropy_from_logits", (_clean(d["logits"][0]),), dict(temperature=0.7), (0,)),
        ("kl_penalty", (_clean(d["lp"]), _clean(d["ref"]), "k3"), {}, (0, 1)),
        ("shape_rewards", (d["scores"], d["lp"], d["ref"], m), dict(kl_coef=0.1), ()),
        ("gae", (d["returns"], d["values"], m), dict(gamma=0.9, lam=0.8, whiten=True), ()),
        ("masked_whiten", (d["adv"], m), dict(shift_mean=False), ()),
        ("aggregate", (d["lp"], m, "seq-mean-token-mean"), {}, (0,)),
        ("policy_loss", (d["lp"], d["old"], d["adv"], m), dict(clip_high=0.28, dual_clip=3.0, is_weights=d["weights"]), (0,)),
        ("value_loss", (d["values"], d["old_values"], d["returns"], m), dict(agg="seq-mean-token-sum"), (0,)),
        ("compute_advantages", (d["scores"], d["lp"], d["ref"], d["values"], m), dict(kl_coef=0.1, estimator="k3"), ()),
        ("ppo_loss", (d["lp"], d["old"], d["adv"], d["values"], d["old_values"], d["returns"], m),
         dict(entropy=d["entropy"], dual_clip=2.0, ent_coef=0.01), (0, 3, "entropy")),
        ("linear_logprobs", (d["hidden"], d["weight"], d["labels"]), dict(bias=d["bias"], mask=m, return_entropy=True, chunk_size=4),
         (0, 1, "bias")),
        ("group_advantages", (d["scores"][:2].repeat(2), 2, torch.ones(4, 3)), dict(estimator="rloo"), ()),
        ("reinforce_pp_advantages", (d["returns"], m), dict(gamma=0.9), ()),
        ("gspo_loss", (d["lp"], d["old"], d["adv"], m), dict(clip_high=0.28, is_weights=d["weights"]), (0,)),
        ("geo_mean_loss", (d["lp"], d["old"], d["adv"], m), dict(agg="token-mean"), (0,)),
    ]


def _flat(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    if isinstance(out, (tuple, list)):
        return [x for o in out for x in _flat(o)]
    return [out]


def test_every_public_op_is_registered():
    public = {"logprobs_from_logits", "entropy_from_logits", "kl_penalty", "shape_rewards", "gae", "masked_whiten",
              "aggregate", "policy_loss", "value_loss", "compute_advantages", "ppo_loss", "linear_logprobs",
              "group_advantages", "reinforce_pp_advantages", "gspo_loss", "geo_mean_loss"}
    assert set(_library.OPS) == public
    for name in public:
        assert hasattr(torch.ops.fastppo, name)
    assert set(_library.DIFFERENTIABLE) == {"logprobs_from_logits", "entropy_from_logits", "kl_penalty", "aggregate",
                                            "policy_loss", "value_loss", "ppo_loss", "linear_logprobs",
                                            "gspo_loss", "geo_mean_loss"}


def _needs_grad(name, args):
    """Differentiable float arguments of the forward op get requires_grad (opcheck then checks autograd)."""
    diff = _library.DIFFERENTIABLE.get(name, ())
    return tuple(a.detach().clone().requires_grad_() if i in diff and isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))


def test_opcheck_every_op(rng):
    d = _data(rng)
    with fastppo.use_backend("torch"):
        for name, cases in _op_args(d).items():
            for args in cases:
                torch.library.opcheck(_library.op(name), _needs_grad(name, args))


def test_opcheck_every_op_on_the_triton_backend(rng):
    """The kernel path's outputs against the fake implementations (shapes, dtypes, strides), one
    case per op; its numbers and gradients through the op are checked against eager below."""
    d = _data(rng)
    with fastppo.use_backend("triton"):
        for name, cases in _op_args(d).items():
            torch.library.opcheck(_library.op(name), _needs_grad(name, cases[0]),
                                  test_utils=("test_faketensor",))


def _backward_args(name, args, rng):
    """Arguments of ``fastppo::<name>_backward`` after a forward with ``args``: the incoming
    gradients, the forward's arguments, [the row statistics and the entropy,] ``needs``."""
    outs = _library._as_tuple(_library.op(name)(*args))
    n_out = _library._N_DIFF_OUT[name](args)
    grads = [torch.randn(o.shape, generator=rng) for o in outs[:n_out]]
    needs = [True] * len(_library.DIFFERENTIABLE[name])
    stats = []
    if name in _library.FROM_STATS:
        at = _library.FROM_STATS[name][1](args)
        stats = [outs[-2], outs[-1], None if at is None else outs[at]]
    return (grads, *args, *stats, needs)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_opcheck_backward_ops(backend, rng):
    d = _data(rng)
    with fastppo.use_backend(backend):
        for name, cases in _op_args(d).items():
            if name not in _library.DIFFERENTIABLE:
                continue
            for args in cases:
                torch.library.opcheck(_library.backward_op(name), _backward_args(name, args, rng))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_op_path_gives_the_eager_numbers_and_gradients(backend, rng):
    """The adapters (what a compiled graph runs) against the eager public op, forward and backward,
    with NaN / inf at masked positions: nothing leaks through the op path either."""
    d = _data(rng)
    with fastppo.use_backend(backend):
        for name, args, kwargs, diff in _public_calls(d):
            results = []
            for fn in (getattr(fastppo, name), getattr(_library, name)):
                leaves = [a.detach().clone().requires_grad_() if i in diff else a for i, a in enumerate(args)]
                kw = {k: (v.detach().clone().requires_grad_() if k in diff else v) for k, v in kwargs.items()}
                outs = _flat(fn(*leaves, **kw))
                inputs = [t for t in list(leaves) + list(kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
                grads = []
                if inputs:
                    gen = torch.Generator().manual_seed(7)
                    pairs = [(o, torch.randn(o.shape, generator=gen)) for o in outs if o.requires_grad]
                    assert pairs, name
                    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs])
                else:
                    assert not any(o.requires_grad for o in outs), f"{name} must carry no gradient"
                results.append((outs, grads))
            (eo, eg), (co, cg) = results
            assert len(eo) == len(co), name
            for a, b in zip(eo, co):
                assert a.shape == b.shape and a.dtype == b.dtype, name
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, equal_nan=False, msg=lambda m: f"{name}: {m}")
            for a, b in zip(eg, cg):
                assert torch.isfinite(b).all(), f"{name}: non-finite gradient (masked garbage leaked)"
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} grad: {m}")


def test_explain_reports_no_graph_break_for_any_op(rng):
    d = _data(rng)
    for name, args, kwargs, _ in _public_calls(d):
        fn = getattr(fastppo, name)
        explained = torch._dynamo.explain(lambda *a: fn(*a, **kwargs))(*args)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        assert explained.graph_count == 1, name
        targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert {f"fastppo.{name}", f"fastppo.{name}.default"} & targets, (name, targets)


class _TinyPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, H)
        self.head = torch.nn.Linear(H, V)
        self.value_head = torch.nn.Linear(H, 1)

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))
        return h, self.head(h), self.value_head(h).squeeze(-1)


def _train_step(model, ids, d, fused_head):
    h, logits, values = model(ids)
    m = d["mask"]
    if fused_head:
        lp, ent = fastppo.linear_logprobs(h, model.head.weight, d["labels"], bias=model.head.bias, mask=m,
                                          return_entropy=True, chunk_size=4)
    else:
        lp, ent = fastppo.logprobs_from_logits(logits, d["labels"], mask=m, return_entropy=True, temperature=0.9)
    pg, pg_stats = fastppo.policy_loss(lp, d["old"], d["adv"], m, clip_high=0.28)
    vf, vf_stats = fastppo.value_loss(values, d["old_values"], d["returns"], m)
    kl = fastppo.aggregate(fastppo.kl_penalty(lp, d["ref"], "k3"), m)
    loss = pg + 0.5 * vf + 0.05 * kl - 0.01 * fastppo.aggregate(ent, m)
    return loss, pg_stats["clipfrac"], pg_stats["approx_kl"], vf_stats["clipfrac"]


def _run_step(step, model, ids, d, fused_head):
    model.zero_grad()
    outs = step(model, ids, d, fused_head)
    outs[0].backward()
    return [o.detach() for o in outs], [p.grad.clone() for p in model.parameters()]


def _compare_compiled(rng, backend, fused_head):
    d = _data(rng)
    d["labels"] = d["labels"].clamp(0, V - 1)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    model = _TinyPolicy()
    ids = torch.randint(0, V, (B, T), generator=rng)
    eager_out, eager_grads = _run_step(_train_step, model, ids, d, fused_head)
    compiled = torch.compile(_train_step, fullgraph=True, backend=backend)
    got_out, got_grads = _run_step(compiled, model, ids, d, fused_head)
    assert all(torch.isfinite(x).all() for x in eager_out + eager_grads)
    for a, b in zip(eager_out, got_out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_grads, got_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_compiled_training_step_matches_eager(rng):
    """policy model -> logprobs_from_logits -> policy/value/KL losses -> backward, fullgraph inductor."""
    torch._dynamo.reset()
    _compare_compiled(rng, "inductor", fused_head=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_fused_head_step_matches_eager(rng, backend):
    """The same step through linear_logprobs (full rows under compile, no nonzero)."""
    torch._dynamo.reset()
    with fastppo.use_backend(backend):
        _compare_compiled(rng, "aot_eager", fused_head=True)


def test_compiled_rollout_ops_carry_no_gradient(rng):
    d = _data(rng)
    lp = d["lp"].clone().requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def rollout(lp, ref, values, scores, mask):
        adv, ret, rew, kl = fastppo.compute_advantages(scores, lp, ref, values, mask, kl_coef=0.1)
        a2, r2 = fastppo.reinforce_pp_advantages(rew, mask)
        return adv, ret, fastppo.masked_whiten(kl, mask), a2, r2

    got = rollout(lp, d["ref"], d["values"], d["scores"], d["mask"])
    adv, ret, rew, kl = fastppo.compute_advantages(d["scores"], d["lp"], d["ref"], d["values"], d["mask"], kl_coef=0.1)
    want = (adv, ret, fastppo.masked_whiten(kl, d["mask"]), *fastppo.reinforce_pp_advantages(rew, d["mask"]))
    for a, b in zip(want, got):
        assert not b.requires_grad
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_labels_raise_eagerly_and_are_clamped_under_compile(backend, rng):
    d = _data(rng)
    labels = d["labels"].clamp(0, V - 1)
    labels[0, 0] = V  # a valid position
    logits = d["logits"].nan_to_num(posinf=0.0)
    with fastppo.use_backend(backend):
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {V}\)"):
            fastppo.logprobs_from_logits(logits, labels)
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {V}\)"):
            fastppo.linear_logprobs(_clean(d["hidden"]), d["weight"], labels)
        # Under tracing the check is skipped (a data-dependent branch); the label is clamped to
        # V - 1, memory-safe, as with FASTPPO_VALUE_CHECKS=0.
        compiled = torch.compile(lambda x, y: fastppo.logprobs_from_logits(x, y), fullgraph=True, backend="aot_eager")
        got = compiled(logits, labels)
        want = fastppo.logprobs_from_logits(logits, labels.clamp(max=V - 1))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_linear_logprobs_full_rows_equal_compacted_rows(rng):
    """The op's no-nonzero path (compact=False) against the eager compacted path, NaN rows masked."""
    from fastppo import linear

    d = _data(rng)
    results = []
    for compact in (True, False):
        h = d["hidden"].clone().requires_grad_()
        w = d["weight"].clone().requires_grad_()
        b = d["bias"].clone().requires_grad_()
        lp, ent = linear.run(h, w, d["labels"], bias=b, mask=d["mask"], temperature=1.0, return_entropy=True,
                             chunk_size=4, folds=linear.TorchFolds, compact=compact)
        g = torch.randn(B, T, generator=torch.Generator().manual_seed(3))
        (lp * g + ent).sum().backward()
        results.append((lp, ent, h.grad, w.grad, b.grad))
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert (results[1][0][~d["mask"]] == 0).all() and (results[1][2][~d["mask"]] == 0).all()


def test_dynamic_shapes_trace_once_and_match_eager(rng):
    """dynamic=True: the checks and the fake implementations work on symbolic sizes and floats."""

    def f(logits, labels, mask, old, adv, temperature):
        lp = fastppo.logprobs_from_logits(logits, labels, mask=mask, temperature=temperature)
        loss, stats = fastppo.policy_loss(lp, old, adv, mask, clip_low=0.2)
        a, _ = fastppo.gae(adv, old, mask, lam=0.9)
        return loss, stats["approx_kl"], a, fastppo.group_advantages(adv[:, 0], 2, mask)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for t in (4, 6):
        logits = torch.randn(4, t, V, generator=rng, requires_grad=True)
        args = (torch.randint(0, V, (4, t), generator=rng), torch.rand(4, t, generator=rng) > 0.3,
                torch.randn(4, t, generator=rng), torch.randn(4, t, generator=rng), 0.8)
        got, want = compiled(logits, *args), f(logits, *args)
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        (g_got,) = torch.autograd.grad(got[0], logits)
        (g_want,) = torch.autograd.grad(want[0], logits)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_empty_and_strided_half_inputs(backend, rng):
    """B = 0 (no output may alias an input, even an empty one), and bf16 inputs with odd
    strides (float32 outputs, as the fake implementations say)."""
    def cases(lg, x, lab, m):
        return [
            ("logprobs_from_logits", (lg.detach().requires_grad_(), lab, m, 1.0, True)),
            ("policy_loss", (x.detach().requires_grad_(), x, x, m, 0.2, None, 2.0, "seq-mean-token-mean", None)),
            ("gae", (x, x, m, 1.0, 0.9, True)),
            ("kl_penalty", (x.detach().requires_grad_(), x.detach().requires_grad_(), "k1", None)),
        ]

    shapes = []
    for b, t in ((0, 3),):  # B = 0: autograd hands back the (empty) incoming gradient itself
        shapes.append(cases(torch.randn(b, t, V), torch.randn(b, t), torch.zeros(b, t, dtype=torch.long),
                            torch.ones(b, t, dtype=torch.bool)))
    lg = torch.randn(B, V, T, generator=rng).transpose(1, 2).bfloat16()  # last dim strided
    x = torch.randn(T, B, generator=rng).t().bfloat16()
    shapes.append(cases(lg, x, torch.randint(0, V, (B, T), generator=rng), torch.rand(B, T, generator=rng) > 0.3))
    utils = None if backend == "torch" else ("test_faketensor",)
    with fastppo.use_backend(backend):
        for group in shapes:
            for name, args in group:
                kwargs = {} if utils is None else dict(test_utils=utils)
                torch.library.opcheck(_library.op(name), args, **kwargs)


# --------------------------------------------------------------------------------------------
# The logits ops' compiled backward: closed form from the forward's row statistics
# --------------------------------------------------------------------------------------------

# (name, input dtype, temperature, return_entropy, mask, what a valid row holds besides finite
# logits). Masked rows hold NaN and inf in every case with a mask.
_LOGIT_CASES = [
    ("masked-garbage", torch.float32, 1.3, True, True, None),
    ("nan-at-a-valid-position", torch.float32, 1.0, False, True, "nan"),
    ("neg-inf-logits", torch.float32, 0.7, True, True, "-inf"),
    ("float64", torch.float64, 0.9, True, True, "-inf"),
    ("bf16", torch.bfloat16, 0.8, False, False, None),
]
_GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12), torch.bfloat16: (2e-2, 2e-2)}


def _logit_case(gen, dtype, mask_on, special):
    """logits [B, T, V], labels, mask or None; a NaN or -inf logit at valid rows off their label."""
    d = _data(gen)
    mask = d["mask"] if mask_on else None
    labels = d["labels"] if mask_on else d["labels"].clamp(0, V - 1)
    logits = d["logits"] if mask_on else _clean(d["logits"])
    logits = logits.clone()
    if mask_on:
        # NaN next to the inf in masked rows.
        logits[~mask] = logits[~mask].masked_fill(torch.rand(V, generator=gen) > 0.5, math.nan)
    if special is not None:
        # Valid positions (0, 0) and (0, 1); never at the label.
        for t in (0, 1):
            col = (int(labels[0, t]) + 3) % V
            logits[0, t, col] = math.nan if special == "nan" and t == 0 else -math.inf
    return logits.to(dtype), labels, mask


def _compare_grads(name, fn, leaves, dtype, gen, truth):
    """fn(*leaves) eagerly and compiled (aot_eager, fullgraph): outputs and gradients equal,
    NaN where eager has NaN and nowhere else; and the compiled gradients within the dtype's
    tolerance of ``truth`` (the same function in fastppo.groundtruth) on the float64 leaves."""
    results = []
    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    for f, cast in ((fn, None), (torch.compile(fn, fullgraph=True, backend="aot_eager"), None),
                    (truth, torch.float64)):
        xs = [x.detach().to(cast or x.dtype).requires_grad_() if x is not None else None for x in leaves]
        outs = _library._as_tuple(f(*xs))
        g = torch.Generator().manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() for o in outs)
        loss.backward()
        results.append((outs, [x.grad for x in xs if x is not None]))
    (eo, eg), (co, cg), (_, tg) = results
    for b, t in zip(cg, tg):
        assert_close(b, t, TOL[dtype], f"{name} compiled grad vs float64 ground truth")
    rtol, atol = _GRAD_TOL[dtype]
    for a, b in zip(eo, co):
        torch.testing.assert_close(b, a, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=1e-6, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    for a, b in zip(eg, cg):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name} grad: {m}")
    return co, cg


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", _LOGIT_CASES, ids=lambda c: c[0])
def test_compiled_logprobs_gradients_equal_eager(backend, case, rng):
    name, dtype, temperature, with_entropy, mask_on, special = case
    logits, labels, mask = _logit_case(rng, dtype, mask_on, special)
    torch._dynamo.reset()
    with fastppo.use_backend(backend):
        (lp, *_), (grad,) = _compare_grads(
            name,
            lambda x: fastppo.logprobs_from_logits(x, labels, mask=mask, temperature=temperature,
                                                   return_entropy=with_entropy),
            [logits], dtype, rng,
            lambda x: gt.logprobs_from_logits(x, labels, mask=mask, temperature=temperature,
                                              return_entropy=with_entropy),
        )
    if mask is not None:
        assert (grad[~mask] == 0).all(), "masked rows must get exactly 0, whatever they hold"
    if special == "nan":
        assert grad[0, 0].isnan().all() and lp[0, 0].isnan(), "NaN at a valid position must propagate"
        assert torch.isfinite(grad[0, 1:]).all()
    elif special == "-inf":
        assert torch.isfinite(grad).all() and (grad[0, 0, (int(labels[0, 0]) + 3) % V] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [c for c in _LOGIT_CASES if c[0] != "masked-garbage"], ids=lambda c: c[0])
def test_compiled_entropy_gradients_equal_eager(backend, case, rng):
    name, dtype, temperature, _, _, special = case
    logits, _, _ = _logit_case(rng, dtype, False, special)
    torch._dynamo.reset()
    with fastppo.use_backend(backend):
        _, (grad,) = _compare_grads(name, lambda x: fastppo.entropy_from_logits(x, temperature=temperature),
                                    [logits], dtype, rng, lambda x: gt.entropy_from_logits(x, temperature=temperature))
    if special == "-inf":
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("case", _LOGIT_CASES, ids=lambda c: c[0])
def test_compiled_linear_logprobs_gradients_equal_eager(backend, case, rng):
    """NaN at a valid position: a NaN hidden value (its row's d hidden, and all of d weight and d
    bias, are NaN); -inf: a -inf bias entry."""
    name, dtype, temperature, with_entropy, mask_on, special = case
    d = _data(rng)
    mask = d["mask"] if mask_on else None
    labels = d["labels"] if mask_on else d["labels"].clamp(0, V - 1)
    hidden = d["hidden"] if mask_on else _clean(d["hidden"])
    bias = d["bias"].clone()
    if special == "nan":
        hidden = hidden.clone()
        hidden[0, 0, 1] = math.nan
    elif special == "-inf":
        col = (int(labels[0, 0]) + 3) % V
        bias[col] = -math.inf
        labels = torch.where(labels == col, (col + 1) % V, labels)
    torch._dynamo.reset()
    with fastppo.use_backend(backend):
        (lp, *_), (dh, dw, db) = _compare_grads(
            name,
            lambda h, w, b: fastppo.linear_logprobs(h, w, labels, bias=b, mask=mask, temperature=temperature,
                                                    return_entropy=with_entropy, chunk_size=4),
            [hidden.to(dtype), d["weight"].to(dtype), bias.to(dtype)], dtype, rng,
            # The ground truth multiplies every row (its masked rows' NaN would reach d weight as
            # 0 * NaN): it gets them as zeros, which the contract makes equivalent.
            lambda h, w, b: gt.linear_logprobs(h if mask is None else torch.where(mask.unsqueeze(-1), h, 0.0), w,
                                               labels, bias=b, mask=mask, temperature=temperature,
                                               return_entropy=with_entropy),
        )
    if mask is not None:
        assert (dh[~mask] == 0).all()
    if special == "nan":
        assert dh[0, 0].isnan().all() and dw.isnan().all() and torch.isfinite(dh[0, 1:]).all()
    else:
        assert all(torch.isfinite(g).all() for g in (dh, dw, db))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_compiled_backward_does_not_run_the_forward_again(backend, rng, monkeypatch):
    """The backward starts from the saved row max and log-sum: no call of the forward's row pass
    (the reference's ``_logprob_rows``, the logprob kernels' forward launcher, the chunked
    forward loop) between the end of the forward and the end of the backward."""
    from fastppo import linear, reference
    from fastppo.kernels import logprob

    calls = []

    def count(module, attr):
        original = getattr(module, attr)

        def counted(*args, **kwargs):
            calls.append(attr)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attr, counted)

    count(reference, "_logprob_rows")
    count(logprob, "_forward")
    count(linear, "forward_pass")
    d = _data(rng)
    cases = [
        lambda x, h, w: fastppo.logprobs_from_logits(x, d["labels"], mask=d["mask"], temperature=1.3,
                                                     return_entropy=True),
        lambda x, h, w: fastppo.entropy_from_logits(_clean(x), temperature=0.7),
        lambda x, h, w: fastppo.linear_logprobs(h, w, d["labels"], mask=d["mask"], return_entropy=True, chunk_size=4),
    ]
    torch._dynamo.reset()
    with fastppo.use_backend(backend):
        for i, fn in enumerate(cases):
            leaves = [t.clone().requires_grad_() for t in (d["logits"], d["hidden"], d["weight"])]
            outs = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
            assert calls, f"case {i}: the counted forward did not run at all"
            calls.clear()
            sum(o.sum() for o in outs).backward()
            assert calls == [], f"case {i}: the backward ran the forward again ({calls})"
