"""The trainer's AdamW: the fused implementation (foreach where fused does not apply), equal to an
independent float64 AdamW, and kept across a resume from any checkpoint."""

from __future__ import annotations

import pytest
import torch

from fastppo.train.models import adamw, keep_adamw_implementation


def _adamw64(params, grads, states, *, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """Loshchilov & Hutter's decoupled AdamW, one step in float64 (torch's defaults otherwise)."""
    out = []
    for p, g, st in zip(params, grads, states):
        st["t"] += 1
        st["m"] = betas[0] * st["m"] + (1 - betas[0]) * g
        st["v"] = betas[1] * st["v"] + (1 - betas[1]) * g * g
        m_hat = st["m"] / (1 - betas[0] ** st["t"])
        v_hat = st["v"] / (1 - betas[1] ** st["t"])
        out.append(p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps))
    return out


def _groups(rng):
    shapes = [(37, 8), (8,), (5, 3, 2)]
    actor = [torch.nn.Parameter(torch.randn(s, generator=rng)) for s in shapes[:2]]
    critic = [torch.nn.Parameter(torch.randn(s, generator=rng)) for s in shapes[2:]]
    return [{"params": actor, "lr": 1e-2}, {"params": critic, "lr": 3e-2}]


@pytest.mark.parametrize("per_tensor", [False, True], ids=["fastppo-adamw", "torch-per-tensor"])
def test_adamw_steps_equal_a_float64_adamw(rng, per_tensor):
    groups = _groups(rng)
    wd = 0.1
    opt = (torch.optim.AdamW(groups, weight_decay=wd, foreach=False) if per_tensor else adamw(groups, wd))
    if not per_tensor:
        assert opt.param_groups[0]["fused"] is True  # CPU and CUDA both have the fused kernel
    ref = [[p.detach().double().clone() for p in g["params"]] for g in groups]
    states = [[{"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in r] for r in ref]
    for _ in range(3):
        grads = [[torch.randn(p.shape, generator=rng, dtype=torch.float64) * 10 ** (4 * torch.rand((), generator=rng).item() - 3) for p in g["params"]]
                 for g in groups]
        for g, gs in zip(groups, grads):
            for p, gr in zip(g["params"], gs):
                p.grad = gr.float()
        opt.step()
        ref = [_adamw64(r, gs, st, lr=g["lr"], wd=wd) for r, gs, st, g in zip(ref, grads, states, groups)]
    for g, r in zip(groups, ref):
        for p, want in zip(g["params"], r):
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_adamw_falls_back_to_foreach_where_fused_is_refused(rng, monkeypatch):
    real = torch.optim.AdamW

    def no_fused(*a, fused=None, **k):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = adamw(_groups(rng), 0.0)
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]


def test_resume_keeps_the_fused_step_and_continues_exactly(rng):
    """A checkpoint written by the per-tensor AdamW (an older run) or by the fused one: after
    loading, the optimizer is fused again and its next step equals an uninterrupted run's."""
    groups = _groups(rng)
    start = [[p.detach().clone() for p in g["params"]] for g in groups]
    grads = [[[torch.randn(p.shape, generator=rng) for p in g["params"]] for g in groups]
             for _ in range(3)]

    def run(opt, gs_list, grp):
        for gs in gs_list:
            for g, row in zip(grp, gs):
                for p, gr in zip(g["params"], row):
                    p.grad = gr.clone()
            opt.step()

    straight = adamw(groups, 0.05)
    run(straight, grads, groups)
    for writer in (lambda grp: torch.optim.AdamW(grp, weight_decay=0.05, foreach=False), lambda grp: adamw(grp, 0.05)):
        grp = [{"params": [torch.nn.Parameter(s.clone()) for s in row], "lr": g["lr"]} for row, g in zip(start, groups)]
        first = writer(grp)
        run(first, grads[:2], grp)
        resumed = adamw(grp, 0.05)
        resumed.load_state_dict(first.state_dict())
        keep_adamw_implementation(resumed)
        assert all(g["fused"] is True for g in resumed.param_groups), [(g["fused"], g["foreach"]) for g in resumed.param_groups]
        run(resumed, grads[2:], grp)
        for g, h in zip(grp, groups):
            for p, q in zip(g["params"], h["params"]):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_trainer_optimizer_is_fused(tmp_path):
    pytest.importorskip("transformers")
    from fastppo.train import PPOTrainer
    from helpers import small_config

    threads = torch.get_num_threads()
    try:
        trainer = PPOTrainer(small_config(tmp_path, iterations=1))
    finally:
        torch.set_num_threads(threads)
    assert len(trainer.optimizer.param_groups) == 2  # actor and critic in one AdamW
    assert all(g["fused"] is True for g in trainer.optimizer.param_groups)
