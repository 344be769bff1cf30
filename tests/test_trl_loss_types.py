"""TRL 1.16 GRPOTrainer ``loss_type`` names mapped to fastppo objectives
(``fastppo.integrations.trl.TRL_LOSS_TYPES``): TRL's published formulas (grpo_trainer.py's
``_compute_loss``, written out below) against the mapped fastppo op, values and gradients, on a
batch with no empty row and T = max_completion_length (where the mapping is exact)."""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo.integrations import trl as ft


def _trl_loss(loss_type, lp, old, adv, mask, *, eps_low=0.2, eps_high=0.28, level="token"):
    """TRL 1.16's GRPO loss (no KL, no vLLM correction, one process, no accumulation)."""
    log_ratio = lp - old
    if level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_w = log_ratio
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * mask.shape[1])
    if loss_type == "dapo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # num_items_in_batch = this batch
    if loss_type == "luspo":
        return (per_token_loss * mask).sum(-1).mean()
    raise AssertionError(loss_type)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_trl_loss_type_matches_fastppo(loss_type, level, rng):
    B, T = 6, 13
    mask = torch.rand(B, T, generator=rng) > 0.3
    mask[:, 0] = True  # no empty row
    old = torch.randn(B, T, generator=rng, dtype=torch.float64).float() - 2
    lp = old + 0.3 * torch.randn(B, T, generator=rng)
    # Sequence-level advantages, as GRPO's (TRL's sequence ratio then has GSPO-token's gradient).
    adv = torch.randn(B, 1, generator=rng).expand(B, T).contiguous()
    name, agg = ft.fastppo_policy_loss(loss_type, level)
    x, y = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    expected = _trl_loss(loss_type, x, old, adv, mask.float(), level=level)
    got, _ = fastppo.get_policy_loss(name)(y, old, adv, mask, agg=agg, clip_low=0.2, clip_high=0.28)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    expected.backward()
    got.backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-6)


def test_mapping_table():
    assert set(ft.TRL_LOSS_TYPES) >= {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}
    with pytest.raises(ValueError, match="no fastppo"):
        ft.fastppo_policy_loss("vespo")
    with pytest.raises(ValueError, match="unknown"):
        ft.fastppo_policy_loss("ppo")
    assert ft.fastppo_policy_loss("cispo") == ("cispo", "token-mean")


def test_every_trl_loss_type_is_in_the_table():
    cfg = pytest.importorskip("trl.trainer.grpo_config")
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(cfg.GRPOConfig)}["loss_type"]
    for name in ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"):
        assert f"'{name}'" in field.metadata["help"], name
        assert name in ft.TRL_LOSS_TYPES
