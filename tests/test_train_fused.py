"""The trainer's fused LM head: log-probs from hidden states through fastppo.linear_logprobs."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import fastppo  # noqa: E402
from fastppo.train import PPOTrainer, builtin  # noqa: E402
from fastppo.train.models import fused_head, position_ids_from, response_logprobs  # noqa: E402

# Quantities that describe the run, not the numbers: they differ between any two runs.
NOT_NUMBERS = ("time_", "tokens_per_s", "generate_tokens_per_s", "peak_memory")


def _run(out, fused: bool, **kw):
    cfg = builtin.default_config(output_dir=str(out), iterations=2, batch_size=16, mini_batch_size=8,
                                 micro_batch_size=4, max_new_tokens=6, ppo_epochs=1, progress=False, plot=False,
                                 fused_head=fused, **kw)
    threads = torch.get_num_threads()
    try:
        PPOTrainer(cfg).train()
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("lora, extra", [
    (0, {}), (4, {}),
    # Critic-free, with the entropy bonus and the KL loss: every term of linear_ppo_loss.
    (4, dict(advantage_estimator="grpo", num_generations=2, ent_coef=0.01, kl_loss_coef=0.1)),
], ids=["full", "lora", "lora-grpo-entropy-kl"])
def test_fused_trainer_metrics_equal_the_logits_path(tmp_path, lora, extra, monkeypatch):
    """Same seed, same built-in task (a tied-embedding Llama): every metric of the fused run equals
    the logits run's within float32 tolerance, with a full actor and with LoRA (whose reference is
    the adapter-disabled actor; its frozen head makes the update's policy loss one
    ``fastppo.linear_ppo_loss`` from the hidden states)."""
    calls = []
    real = fastppo.linear_ppo_loss
    monkeypatch.setattr(fastppo, "linear_ppo_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fastppo.use_backend("auto"):  # on CPU: the chunked PyTorch path of linear_logprobs
        fused = _run(tmp_path / "fused", True, lora_r=lora, **extra)
        assert (len(calls) > 0) == (lora > 0), len(calls)
        logits = _run(tmp_path / "logits", False, lora_r=lora, **extra)
    assert len(fused) == len(logits) == 2
    for a, b in zip(fused, logits):
        for key, want in b.items():
            if key.startswith(NOT_NUMBERS) or not isinstance(want, (int, float)):
                continue
            assert a[key] == pytest.approx(want, rel=1e-4, abs=1e-5), f"step {b['step']} {key}"
        assert "peak_memory_mb" in a and a["peak_memory_mb"] > 0  # max RSS on a CPU


def test_response_logprobs_fused_equals_logits_and_reads_only_response_positions(tmp_path):
    model_dir, _ = builtin.materialize(str(tmp_path), seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, model.config.vocab_size, (3, 9), generator=g)
    attn = torch.ones_like(seq)
    attn[0, :2] = 0  # a left-padded prompt
    pos = position_ids_from(attn)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    try:
        lp, ent = response_logprobs(model, seq, attn, pos, 5, mask, 0.7, fused=True)
        assert not seen, "the fused path must not run the LM head over the sequence"
        want_lp, want_ent = response_logprobs(model, seq, attn, pos, 5, mask, 0.7, fused=False)
        assert seen and seen[0][1] == 4  # the logits path runs the head at the 4 scored positions only
    finally:
        hook.remove()
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    (lp.sum() + ent.sum()).backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_softcapped_head_falls_back_to_logits_with_one_notice(capsys):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(cfg)
    assert fused_head(model) is None
    assert fused_head(model) is None
    err = capsys.readouterr().err
    assert err.count("final_logit_softcapping=30.0") == 1, err
    seq = torch.randint(0, 50, (2, 6))
    attn = torch.ones_like(seq)
    mask = torch.ones(2, 3, dtype=torch.bool)
    lp, _ = response_logprobs(model, seq, attn, position_ids_from(attn), 3, mask, 1.0, fused=True)
    want = torch.log_softmax(model(input_ids=seq).logits[:, 2:-1].double(), -1).gather(-1, seq[:, 3:, None])[..., 0]
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)
