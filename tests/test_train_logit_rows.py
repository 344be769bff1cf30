"""No phase of a trainer iteration builds logits for more positions than it samples or scores.

A forward hook on the LM head (the output embedding) of the actor and of the reference counts the
rows each call produces: generation samples from one position per row and step, and the scoring
and update forwards score the R response positions, so no call may produce logits for a prompt
position (the old prompt forward built ``[B, P, V]``, the old ``--no-fused-head`` path ``[B, P + R, V]``).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from fastppo.train import PPOTrainer  # noqa: E402
from fastppo.train.models import TokenScorer, position_ids_from  # noqa: E402
from helpers import small_config  # noqa: E402

MAX_NEW = 2  # shorter than every built-in prompt, so a prompt-position row shows in the shape


def _hooked_run(tmp_path, **kw):
    cfg = small_config(tmp_path, iterations=1, max_new_tokens=MAX_NEW, save_every=0, **kw)
    threads = torch.get_num_threads()
    try:
        trainer = PPOTrainer(cfg)
        heads = {id(m): m for m in (trainer.actor.get_output_embeddings(),
                                    None if trainer.reference is None else trainer.reference.get_output_embeddings())
                 if m is not None}
        calls = []  # (phase, leading shape of the logits)
        phase = ["score"]
        generate = trainer.generate

        def sampling(*a, **k):
            phase[0] = "generate"
            try:
                return generate(*a, **k)
            finally:
                phase[0] = "score"

        trainer.generate = sampling  # the HF engine samples through trainer.generate

        def hook(mod, inp, out):
            calls.append((phase[0] if not torch.is_grad_enabled() else "update", tuple(out.shape[:-1])))

        handles = [m.register_forward_hook(hook) for m in heads.values()]
        try:
            trainer.train()
        finally:
            for h in handles:
                h.remove()
    finally:
        torch.set_num_threads(threads)
    shortest_prompt = min(len(p) for p in trainer.prompt_ids)
    return calls, shortest_prompt


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "no-fused-head"])
def test_no_phase_builds_logits_beyond_what_it_samples_or_scores(tmp_path, fused):
    calls, shortest_prompt = _hooked_run(tmp_path, fused_head=fused)
    assert shortest_prompt > MAX_NEW, shortest_prompt
    for what, shape in calls:
        assert len(shape) == 2 and shape[0] <= 8, (what, shape)
    sampling = [s for what, s in calls if what == "generate"]
    # The prompt forward and each decode step: one logits row per response and step.
    assert 1 <= len(sampling) <= MAX_NEW and all(s == (8, 1) for s in sampling), calls
    scoring = [s for what, s in calls if what != "generate"]
    if fused:
        # Scoring and updates take log-probs from the hidden states through fastppo.linear_logprobs.
        assert not scoring, calls
    else:
        # Old and reference log-probs (no grad) and the update's forward (grad), each over the R
        # response positions only.
        assert {w for w, _ in calls} == {"generate", "score", "update"}, calls
        width = scoring[0][1]
        assert 1 <= width <= MAX_NEW and all(s == (8, width) for s in scoring), calls


def test_reward_head_reads_only_the_last_token(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    scorer = TokenScorer(LlamaForSequenceClassification(cfg)).eval()
    seq = torch.randint(1, 40, (3, 7))
    attn = torch.ones_like(seq)
    attn[1, :3] = 0
    pos = position_ids_from(attn)
    last = torch.tensor([6, 4, 2])
    seen = []
    h = scorer.head.register_forward_hook(lambda m, i, o: seen.append(math.prod(o.shape[:-1])))
    try:
        got = scorer.score_last(seq, attn, pos, last)
    finally:
        h.remove()
    assert seen == [3]
    with torch.no_grad():
        full = scorer(seq, attn, pos).double()
    want = full[torch.arange(3), last]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
