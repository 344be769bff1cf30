"""Padding-free forwards and token-budget micro-batches (fastppo/train/packing.py, issue 22).

* grouping and the packed layout on worked examples;
* every forward (old and reference log-probs, entropies, values, reward-model scores) packed equals
  the padded one and a float64 ground truth (each sequence run alone, unpadded, in float64), on very
  uneven lengths; tolerance: float32 (atol 2e-5 on log-probs of magnitude ~4, rtol 1e-5);
* isolation: a sequence's log-probs do not change when the sequence packed next to it changes;
* a model that fails the start-up check (OPT: positions from the attention mask) runs padded with
  a notice, with the same scores;
* whole iterations packed equal padded ones (metrics and every weight after the update) for gae,
  grpo with LoRA and gradient checkpointing, reinforce++ without the fused head; with
  ``micro_batch_tokens`` the accumulated gradient is the one-micro-batch gradient;
* token budgets are respected and the weights are each group's share of the mini-batch;
* 2 ranks under torchrun, packed with a token budget, equal one process on the same global batch.

Run as a script (``python -m torch.distributed.run ... tests/test_train_packing.py MODE OUT``) this
file is the worker the torchrun test launches.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


# --------------------------------------------------------------------------------------------
# worker side (also used by the one-process tests)

def uneven_generate(trainer, longest: int, skew: bool = False):
    """Responses fixed by each prompt's tokens, 1 to ``longest`` tokens (about half of a padded
    response batch is padding); rank-independent, so one process and two ranks see the same batch.
    ``skew``: the prompts of the first half of the next global batch (rank 0's under 2 ranks) get
    ``longest - 2`` to ``longest`` tokens, the others 1 or 2 (found by running a copy of the sampler)."""
    from helpers import pad_responses

    tok = trainer.tokenizer
    vocab = len(tok)
    cfg = trainer.config
    first = copy.deepcopy(trainer.sampler).next(cfg.batch_size // cfg.num_generations) if skew else []
    long_prompts = {tuple(int(t) for t in trainer.prompt_ids[i]) for i in first[:len(first) // 2]}

    def generate(prompt_ids, prompt_mask, *, logprobs=False):
        assert not logprobs, "no rollout correction in these runs: the sampler's log-probs are not asked for"
        rows = []
        seen: dict[tuple[int, ...], int] = {}
        for ids, m in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            real = [i for i, k in zip(ids, m) if k]
            h = sum(i * (j + 3) for j, i in enumerate(real))
            length = 1 + (h * 7919) % longest
            if skew:
                # a prompt's repeats (num_generations, consecutive rows of one rank) answer differently,
                # so group advantages are not all 0
                seen[tuple(real)] = seen.get(tuple(real), -1) + 1
                h += 101 * seen[tuple(real)]
                length = longest - h % 3 if tuple(real) in long_prompts else 1 + h % 2
            toks = [4 + (h * (t + 1) + t) % (vocab - 4) for t in range(length)]
            if h % 3 == 0:
                toks[-1] = tok.eos_token_id
            rows.append(toks)
        return pad_responses(rows, tok.pad_token_id, prompt_ids.device)

    return generate


def one_update(out: str, **options):
    """One iteration (ppo_epochs 1, two optimizer steps) on the fixed uneven batch; returns (trainer,
    metrics row, {name: weight} of the actor and critic after it, the same before it)."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fastppo.train import PPOTrainer, builtin, distributed

    base = dict(output_dir=out, iterations=1, batch_size=8, mini_batch_size=4, micro_batch_size=4, ppo_epochs=1,
                max_new_tokens=16, progress=False, plot=False, overwrite=True)
    base.update(options)
    skew = base.pop("skew", False)
    trainer = PPOTrainer(builtin.default_config(**base))
    trainer.generate = uneven_generate(trainer, 16, skew)

    def weights():
        params = get_model_state_dict(distributed._modules(trainer),
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().clone() for k, v in params.items()}

    before = weights()
    row = trainer.iteration()
    return trainer, row, weights(), before


TORCHRUN = {"gae": dict(advantage_estimator="gae"),
            # group advantages are computed on the sampling rank, before its rows move
            "grpo": dict(advantage_estimator="grpo", num_generations=2, loss_agg="seq-mean-token-mean")}


def _worker(out: str, mode: str) -> None:
    import torch
    import torch.distributed as dist

    trainer, row, params, _ = one_update(out, micro_batch_tokens=24, skew=True, **TORCHRUN[mode])
    pk = trainer.packing
    packs = [pk.packs(trainer.actor), pk.packs(trainer.reference), pk.packs(trainer.critic)]
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, dict(pk.token_counts))
    if dist.get_rank() == 0:
        longest = max(len(p) for p in trainer.prompt_ids) + 16  # a row's most tokens
        torch.save({"row": row, "params": params, "packs": packs, "counts": counts, "longest": longest},
                   os.path.join(out, "result.pt"))
    # Both ranks reach the teardown together: a rank that closes its gloo pairs while the other is
    # still writing was seen to abort once ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    sys.exit(0)


# --------------------------------------------------------------------------------------------
# test side

import torch  # noqa: E402

pytest.importorskip("transformers")

from fastppo.train import builtin, packing  # noqa: E402
from fastppo.train.distributed import Distributed  # noqa: E402
from fastppo.train.models import TokenScorer, position_ids_from  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NOT_NUMBERS = ("time_", "tokens_per_s", "generate_tokens_per_s", "peak_memory")


def test_first_fit_decreasing_worked_example():
    # longest first: 9 opens group 0, 7 group 1, 5 group 2; 4 joins 5 (room 5), 3 joins 7 (room 3),
    # 2 fits nowhere (rooms 1, 0, 1) and opens group 3
    assert packing.first_fit_decreasing([5, 9, 3, 7, 2, 4], 10) == [[1], [3, 2], [0, 5], [4]]
    assert packing.first_fit_decreasing([12, 3], 10) == [[0], [1]]  # over the budget: alone
    assert packing.first_fit_decreasing([], 10) == []
    # into the lighter group: 5 -> A, 4 -> B, 3 -> B (7), 3 -> A (8), 1 -> B (8)
    assert packing.balanced_groups([5, 4, 3, 3, 1], 2) == [[0, 3], [1, 2, 4]]
    assert packing.balanced_groups([2], 3) == [[0], [], []]
    # exactly k groups (first-fit decreasing needs 2 here): balanced, within the budget
    assert packing.budget_groups([6, 6, 3], 9) == [[0, 2], [1]]
    assert packing.budget_groups([6, 6, 3], 9, 3) == [[0], [1], [2]]


def _rows(prompts: list[list[int]], responses: list[list[int]], pad: int = 0):
    """Left-padded prompts + right-padded responses: (seq, attn, pos, width, mask)."""
    width = max(len(p) for p in prompts)
    r = max(len(x) for x in responses)
    seq = torch.full((len(prompts), width + r), pad, dtype=torch.long)
    attn = torch.zeros_like(seq)
    for b, (p, x) in enumerate(zip(prompts, responses)):
        seq[b, width - len(p):width] = torch.tensor(p)
        seq[b, width:width + len(x)] = torch.tensor(x)
        attn[b, width - len(p):width + len(x)] = 1
    return seq, attn, position_ids_from(attn), width, attn[:, width:].bool()


def test_rank_partition_balanced_deterministic_every_row_once(rng):
    # longest first onto the lighter rank: 5 | 4, 3 -> 7, 2 -> 7, 1 (a tie: the lower rank) -> 8
    assert packing.rank_partition([5, 1, 4, 2, 3], 2) == [[0, 1, 3], [2, 4]]
    for world in (1, 2, 3, 4):
        for n in (0, 1, 3, 17, 64):
            lengths = torch.randint(1, 200, (n,), generator=rng).tolist()
            parts = packing.rank_partition(lengths, world)
            assert len(parts) == world
            assert sorted(i for p in parts for i in p) == list(range(n))  # every row exactly once
            assert all(p == sorted(p) for p in parts)
            sums = [sum(lengths[i] for i in p) for p in parts]
            # the greedy bound: the heaviest rank exceeds the lightest by at most the longest row
            assert max(sums) - min(sums) <= max(lengths, default=0)
            assert packing.rank_partition(list(lengths), world) == parts  # the same on every rank
    with pytest.raises(ValueError, match="world must be >= 1"):
        packing.rank_partition([1], 0)


def test_layout_worked_example():
    # lengths 8, 5, 3: rows as wide as the longest; the 5 and the 3 share the second row
    seq, attn, pos, width, _ = _rows([[11, 12, 13], [21], [31, 32]], [[14, 15, 16, 17, 18], [22, 23, 24, 25], [33]])
    lay = packing.build_layout(seq, attn, pos, width, pad_id=0)
    assert lay.input_ids.tolist() == [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25, 31, 32, 33]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 0, 1, 2]]
    # the state before response token t: prompt end + t; masked positions point at the row's start
    assert lay.index.tolist() == [[2, 3, 4, 5, 6], [8, 9, 10, 11, 8], [14, 13, 13, 13, 13]]
    assert lay.last.tolist() == [7, 12, 15]
    # a tail after the last sequence counts on from the row's width: a sequence of its own
    seq, attn, pos, width, _ = _rows([[1, 2, 3, 4], [5, 6]], [[7], [8]])
    lay = packing.build_layout(seq, attn, pos, width, pad_id=0)
    assert lay.input_ids.tolist() == [[1, 2, 3, 4, 7], [5, 6, 8, 0, 0]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    # a row without a prompt token has no state to score its first token from: padded
    seq, attn, pos, width, _ = _rows([[1, 2], [3]], [[7], [8]])
    attn[1, :width] = 0
    assert packing.build_layout(seq, attn, position_ids_from(attn), width, pad_id=0) is None


def _models(seed: int = 0, reward=None):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    actor = AutoModelForCausalLM.from_config(builtin.build_model_config()).eval()
    reference = AutoModelForCausalLM.from_config(builtin.build_model_config()).eval()
    critic = TokenScorer(AutoModelForSequenceClassification.from_config(builtin.build_model_config(num_labels=1)))
    rm = reward if reward is not None else AutoModelForSequenceClassification.from_config(
        builtin.build_model_config(num_labels=1))
    for m in (critic.model, rm):
        with torch.no_grad():
            m.score.weight.normal_(0, 1.0)
    return actor, reference, critic.eval(), TokenScorer(rm).eval()


def _packing(actor, reference, critic, reward, **cfg):
    config = SimpleNamespace(padding_free=True, micro_batch_tokens=None, **cfg)
    fake = SimpleNamespace(config=config, dist=Distributed(False), tokenizer=SimpleNamespace(pad_token_id=0),
                           device=torch.device("cpu"), bf16=False, actor=actor, reference=reference, critic=critic,
                           reward_model=reward)
    return packing.Packing(fake)


def _uneven(rng, b=8, vocab=40):
    """Prompts of 1-10 tokens, responses of 1-24: about half of the padded response block is padding."""
    lens_p = torch.randint(1, 11, (b,), generator=rng).tolist()
    lens_r = torch.randint(1, 25, (b,), generator=rng).tolist()
    lens_r[0] = 24
    prompts = [torch.randint(4, vocab, (n,), generator=rng).tolist() for n in lens_p]
    responses = [torch.randint(4, vocab, (n,), generator=rng).tolist() for n in lens_r]
    return _rows(prompts, responses)


def _float64_truth(actor, reference, critic, reward, seq, attn, width):
    """Each sequence alone, unpadded, every model in float64: log-probs, entropies, values, scores."""
    a64, r64 = copy.deepcopy(actor).double(), copy.deepcopy(reference).double()
    c64, rm64 = copy.deepcopy(critic).double(), copy.deepcopy(reward).double()
    b, total = seq.shape
    out = {k: torch.zeros(b, total - width, dtype=torch.float64) for k in ("lp", "ent", "ref", "values")}
    out["scores"] = torch.zeros(b, dtype=torch.float64)
    with torch.no_grad():
        for i in range(b):
            real = attn[i] != 0
            ids = seq[i][real][None]
            p = int(real[:width].sum())
            n = ids.shape[1]
            pos = torch.arange(n)[None]
            resp = ids[0, p:]
            for key, model in (("lp", a64), ("ref", r64)):
                logp = torch.log_softmax(model(input_ids=ids, position_ids=pos).logits[0, p - 1:n - 1], -1)
                out[key][i, :len(resp)] = logp.gather(1, resp[:, None])[:, 0]
                if key == "lp":
                    out["ent"][i, :len(resp)] = -(logp.exp() * logp).sum(-1)
            hidden = c64.backbone(input_ids=ids, position_ids=pos).last_hidden_state[0]
            out["values"][i, :len(resp)] = c64.head(hidden[p - 1:n - 1])[:, 0]
            hidden = rm64.backbone(input_ids=ids, position_ids=pos).last_hidden_state[0]
            out["scores"][i] = rm64.head(hidden[n - 1])[0]
    return out


def _forwards(pk, actor, reference, critic, reward, seq, attn, pos, width, mask):
    batch = pk.batch(seq, attn, pos, width)
    with torch.no_grad():
        lp, ent = pk.logprobs(actor, batch, mask, 1.0, True)
        ref, _ = pk.logprobs(reference, batch, mask, 1.0, False)  # the model's own logits, packed too
        values = torch.where(mask, pk.values(critic, batch), 0.0)
        scores = pk.score_last(reward, batch)
    return {"lp": lp, "ent": ent, "ref": ref, "values": values, "scores": scores}, batch


def test_packed_forwards_equal_padded_and_float64(rng):
    models = _models()
    seq, attn, pos, width, mask = _uneven(rng)
    pk = _packing(*models)
    assert all(pk.packs(m) for m in models)
    packed, batch = _forwards(pk, *models, seq, attn, pos, width, mask)
    pk.enabled = False
    padded, _ = _forwards(pk, *models, seq, attn, pos, width, mask)
    truth = _float64_truth(*models, seq, attn, width)
    lay = batch.layout
    assert lay.tokens < seq.numel() and lay.input_ids.shape[0] < seq.shape[0]  # fewer, shorter rows
    assert (lay.input_ids != 0).sum() == attn.sum()  # every real token once, no padding inside
    for key, want in truth.items():
        for name, got in (("packed", packed[key]), ("padded", padded[key])):
            assert got.dtype == torch.float32
            m = mask if got.dim() == 2 else torch.ones_like(got, dtype=torch.bool)
            torch.testing.assert_close(got.double()[m], want[m], rtol=1e-5, atol=2e-5, msg=lambda s: f"{name} {key}: {s}")
            if got.dim() == 2:
                assert (got[~mask] == 0).all(), f"{name} {key}: masked positions"
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-5, atol=2e-5)


def test_isolation_a_sequence_does_not_see_its_neighbour(rng):
    """Sequence A shares a row with B, then with C (other tokens, another length): A's log-probs stay
    those of A alone, to the last bit of float32 tolerance."""
    actor = _models()[0]
    pk = _packing(actor, None, None, None)
    a_p, a_r = [5, 9, 7], [11, 12, 13, 14]
    longest = ([6] * 9, [8] * 9)  # 18 tokens: rows are 18 wide, A (7) and its neighbour (<= 11) share one
    results = []
    for neighbour in (([20, 21], [22, 23, 24, 25, 26, 27, 28]), ([30, 31, 32, 33, 34], [35, 36, 37])):
        prompts, responses = [longest[0], a_p, neighbour[0]], [longest[1], a_r, neighbour[1]]
        seq, attn, pos, width, mask = _rows(prompts, responses)
        batch = pk.batch(seq, attn, pos, width)
        assert batch.layout.input_ids.shape[0] == 2  # A and its neighbour packed into one row
        with torch.no_grad():
            lp, _ = pk.logprobs(actor, batch, mask, 1.0)
        results.append(lp[1, :4])
    seq, attn, pos, width, mask = _rows([a_p], [a_r])
    with torch.no_grad():
        alone, _ = pk.logprobs(actor, pk.batch(seq, attn, pos, width), mask, 1.0)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0], alone[0], rtol=0, atol=1e-6)


def test_a_model_failing_the_check_runs_padded_with_a_notice(rng, capsys):
    """OPT takes its positions from the attention mask, not position_ids: packed it would be wrong,
    so the check sends it to padded rows; its scores still equal the float64 ones."""
    from transformers import OPTConfig, OPTForSequenceClassification

    torch.manual_seed(1)
    opt = OPTForSequenceClassification(OPTConfig(vocab_size=40, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                                 num_attention_heads=2, word_embed_proj_dim=32, num_labels=1,
                                                 max_position_embeddings=64, pad_token_id=0))
    assert packing.probe_scorer(TokenScorer(opt).eval(), torch.device("cpu")) is not None
    actor, reference, critic, reward = _models(reward=opt)
    pk = _packing(actor, reference, critic, reward)
    err = capsys.readouterr().err
    assert "the reward model (OPTForSequenceClassification) runs on padded rows" in err
    assert err.count("padding-free") == 1  # one line, for the one model that fails
    assert not pk.packs(reward) and pk.packs(actor) and pk.packs(critic)
    seq, attn, pos, width, mask = _uneven(rng)
    with torch.no_grad():
        scores = pk.score_last(reward, pk.batch(seq, attn, pos, width))
    truth = _float64_truth(actor, reference, critic, reward, seq, attn, width)["scores"]
    torch.testing.assert_close(scores.double(), truth, rtol=1e-5, atol=2e-5)


def _close_runs(got, want_row, want_params, start, rtol=1e-4, atol=1e-6):
    """Metrics within float32 tolerance; weights too, except that Adam's step is lr * m / (sqrt(v) +
    eps): an element whose gradient is near eps moves by a fraction of lr that two summation orders
    round differently (seen: one element of 8192 off by 2.8 % of lr after two steps), so the absolute
    slack is 5 % of the tensor's largest step. The gradients themselves are compared tightly in
    test_loss_and_gradients_packed_equal_padded."""
    row, params = got
    for key, want in want_row.items():
        if key.startswith(NOT_NUMBERS) or not isinstance(want, (int, float)):
            continue
        assert row[key] == pytest.approx(want, rel=rtol, abs=atol), key
    assert params.keys() == want_params.keys()
    moved = 0
    for k, v in want_params.items():
        step = float((v - start[k]).abs().max()) if k in start and start[k].shape == v.shape else 0.0
        moved += step > 0
        torch.testing.assert_close(params[k], v, rtol=rtol, atol=atol + 5e-2 * step, msg=lambda s, k=k: f"{k}: {s}")
    assert moved > 3  # the update really changed weights


@pytest.mark.parametrize("options", [
    dict(),
    dict(advantage_estimator="grpo", num_generations=2, lora_r=4, gradient_checkpointing=True, kl_loss_coef=0.1,
         ent_coef=0.01),
    dict(advantage_estimator="reinforce++", fused_head=False, loss_agg="seq-mean-token-mean", micro_batch_tokens=30),
    dict(loss_agg="token-mean", micro_batch_tokens=20),
], ids=["gae", "grpo-lora-checkpointing", "reinforce++-logits-seq-mean-budget", "gae-token-mean-budget"])
def test_iteration_packed_equals_padded(tmp_path, options):
    """One iteration packed (with token-budget micro-batches where set) against the padded one with
    each mini-batch in one micro-batch: the metrics and every trained weight after two optimizer
    steps agree (the budgeted micro-batches' weights make their gradient the whole mini-batch's)."""
    packed = one_update(str(tmp_path / "packed"), **options)
    trainer = packed[0]
    assert trainer.packing.enabled and trainer.packing.packs(trainer.actor)
    padded_options = {k: v for k, v in options.items() if k != "micro_batch_tokens"}
    padded = one_update(str(tmp_path / "padded"), padding_free=False, **padded_options)
    assert not padded[0].packing.enabled
    assert packed[1]["response_length"] > 4 and packed[1]["grad_norm"] > 0
    _close_runs(packed[1:3], padded[1], padded[2], padded[3])


@pytest.mark.parametrize("options", [dict(), dict(lora_r=4, gradient_checkpointing=True, loss_agg="seq-mean-token-sum")],
                         ids=["full", "lora-checkpointing"])
def test_loss_and_gradients_packed_equal_padded(tmp_path, rng, options):
    """The update's loss, its statistics and the gradient of every actor and critic weight, packed
    against padded, on one micro-batch of the uneven rollout with random advantages and targets."""
    from fastppo.train import PPOTrainer

    cfg = builtin.default_config(output_dir=str(tmp_path), iterations=1, batch_size=8, mini_batch_size=8,
                                 micro_batch_size=8, max_new_tokens=16, progress=False, plot=False, **options)
    trainer = PPOTrainer(cfg)
    ids = [trainer.prompt_ids[i] for i in range(0, 64, 8)]
    from fastppo.train.data import left_pad

    prompt_ids, prompt_mask = left_pad(ids, trainer.tokenizer.pad_token_id, trainer.device)
    responses, mask = uneven_generate(trainer, 16)(prompt_ids, prompt_mask)
    seq = torch.cat([prompt_ids, responses], 1)
    attn = torch.cat([prompt_mask, mask.long()], 1)
    pos = position_ids_from(attn)
    width = prompt_ids.shape[1]
    shape = mask.shape
    noise = lambda scale: torch.randn(shape, generator=rng) * scale  # noqa: E731
    with torch.no_grad():
        lp, _ = trainer.packing.logprobs(trainer.actor, trainer.packing.batch(seq, attn, pos, width), mask, 1.0)
    inputs = dict(mask=mask, old_logprobs=lp + noise(0.1), advantages=noise(1.0), old_values=noise(0.1),
                  returns=noise(1.0), ref_logprobs=lp + noise(0.05))
    with torch.no_grad():  # zero-initialised value head and LoRA B would leave most gradients 0
        trainer.critic.head.weight.normal_(0, 1.0, generator=rng)
        for name, p in trainer.actor.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=rng)
    micro = torch.arange(shape[0])
    results = []
    for enabled in (True, False):
        trainer.packing.enabled = enabled
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, stats = trainer._loss(micro, seq, attn, pos, width, **inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in list(trainer.actor.named_parameters()) +
                 list(trainer.critic.named_parameters()) if p.grad is not None}
        results.append((loss.detach(), {k: v.detach() for k, v in stats.items()}, grads))
    (loss_p, stats_p, grads_p), (loss_d, stats_d, grads_d) = results
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-5, atol=1e-6)
    assert stats_p.keys() == stats_d.keys()
    for k in stats_d:
        torch.testing.assert_close(stats_p[k], stats_d[k], rtol=1e-5, atol=1e-6, msg=k)
    assert grads_p.keys() == grads_d.keys() and len(grads_d) > 2
    nonzero = 0
    for k, g in grads_d.items():
        scale = float(g.abs().max())
        nonzero += scale > 0
        torch.testing.assert_close(grads_p[k], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda s, k=k: f"{k}: {s}")
    assert nonzero == len(grads_d)


def test_micro_batch_tokens_respected_and_weighted(rng, capsys):
    from fastppo.train.distributed import TOKEN_STATS

    b = 16
    lens_p = torch.randint(1, 9, (b,), generator=rng)
    lens_r = torch.randint(0, 25, (b,), generator=rng)
    lens_r[3] = 0  # an empty response: no valid token
    seq, attn, pos, width, mask = _rows([[5] * int(n) for n in lens_p], [[6] * max(int(n), 1) for n in lens_r])
    mask[3] = False
    attn[3, width:] = 0
    lens_r[3] = 0
    total = (lens_p + lens_r).tolist()
    budget = 34  # over the longest (8 + 24): no notice yet
    pk = _packing(_models()[0], None, None, None, micro_batch_size=4)
    pk.budget = budget
    mini = torch.randperm(b, generator=rng)[:12]
    for agg in ("token-mean", "seq-mean-token-mean", "token-sum"):
        groups = pk.micro_batches(mini, mask, attn, 4, agg)
        rows = torch.cat([g[0] for g in groups])
        assert sorted(rows.tolist()) == sorted(mini.tolist())  # every row of the mini-batch once
        for g, w, stat in groups:
            tokens = sum(total[i] for i in g.tolist())
            assert tokens <= budget or len(g) == 1
            valid = mask[g]
            want = {"token-mean": valid.sum() / mask[mini].sum(),
                    "seq-mean-token-mean": valid.any(1).sum() / mask[mini].any(1).sum(),
                    "token-sum": torch.tensor(1.0)}[agg]
            assert w == pytest.approx(float(want))
            assert stat("clipfrac") == pytest.approx(float(valid.sum() / mask[mini].sum()))
            assert "clipfrac" in TOKEN_STATS and stat("policy_loss") == pytest.approx(w)
        if agg != "token-sum":
            assert sum(w for _, w, _ in groups) == pytest.approx(1.0)
    fwd = pk.forward_groups(attn, 4)
    assert sorted(torch.cat([g for g, _ in fwd]).tolist()) == list(range(b))
    assert all(sum(total[i] for i in g.tolist()) <= budget or len(g) == 1 for g, keep in fwd if keep)
    # a sequence longer than the budget: alone, and said once
    assert capsys.readouterr().err == ""
    pk.budget = 5
    for _ in range(2):
        assert all(len(g) == 1 for g, _ in pk.forward_groups(attn, 4) if sum(total[i] for i in g.tolist()) > 5)
    err = capsys.readouterr().err
    assert err.count("fastppo train: micro_batch_tokens (--micro-batch-tokens) 5: a sequence of") == 1, err


def test_config_checks_micro_batch_tokens():
    from fastppo.train.config import ConfigError, PPOConfig

    with pytest.raises(ConfigError, match=r"micro_batch_tokens \(--micro-batch-tokens\) must be an integer >= 1"):
        PPOConfig(micro_batch_tokens=0).check()
    assert PPOConfig().padding_free is True and PPOConfig().micro_batch_tokens is None


def _env() -> dict[str, str]:
    from helpers import torchrun_env

    return torchrun_env(ROOT)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("mode", sorted(TORCHRUN))
def test_two_ranks_packed_with_token_budget_equal_one_process(tmp_path, mode):
    """Rank 0 samples the long responses, rank 1 the short ones; the updates' rows are re-split
    among the ranks by tokens (then packed into micro-batches of at most 24 tokens, the same number
    per rank); the weights after two optimizer steps and the metrics equal one process with each
    mini-batch in one padded micro-batch."""
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", HERE, str(out), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    got = torch.load(out / "result.pt", weights_only=True)
    # the sharded actor, reference and (gae) critic all ran packed
    assert got["packs"] == [True, True, mode == "gae"]
    sampled = [c["sampled"] for c in got["counts"]]
    updated = [c["updated"] for c in got["counts"]]
    # each of the two mini-batches is split with the ranks' sums at most one row's tokens apart
    assert sum(sampled) == sum(updated)
    assert sampled[0] > 2 * sampled[1], (sampled, updated)  # the sampled rows are deliberately uneven
    assert abs(updated[0] - updated[1]) <= 2 * got["longest"], (sampled, updated)
    assert abs(updated[0] - updated[1]) < (sampled[0] - sampled[1]) / 2, (sampled, updated)
    # the rollout's no-grad forwards: the whole batch split once, at most one row's tokens apart
    f_sampled = [c["forward_sampled"] for c in got["counts"]]
    f_run = [c["forward_run"] for c in got["counts"]]
    assert f_sampled == sampled and sum(f_run) == sum(f_sampled)
    assert abs(f_run[0] - f_run[1]) <= got["longest"], (f_sampled, f_run)
    _, row, params, start = one_update(str(tmp_path / "one"), padding_free=False, skew=True, **TORCHRUN[mode])
    _close_runs((got["row"], got["params"]), row, params, start)
