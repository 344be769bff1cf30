"""Memory switches of ``fastppo train``: --gradient-checkpointing and the LoRA critic (--critic-lora-r)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import fastppo  # noqa: E402
from fastppo.train import ConfigError, PPOTrainer, builtin  # noqa: E402
from fastppo.train.models import response_logprobs  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"), pytest.mark.usefixtures("torch_backend")]



def small(out, **kw):
    base = dict(output_dir=str(out), iterations=1, batch_size=8, mini_batch_size=8, micro_batch_size=4,
                max_new_tokens=5, ppo_epochs=1, progress=False, plot=False, seed=3)
    base.update(kw)
    return builtin.default_config(**base)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------
# gradient checkpointing

@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_first_update(tmp_path, lora_r):
    runs = {}
    for gc in (False, True):
        trainer = PPOTrainer(small(tmp_path / str(gc), lora_r=lora_r, gradient_checkpointing=gc))
        row = trainer.iteration()
        runs[gc] = (row, _trainable(trainer.actor), _trainable(trainer.critic))
    (a, actor_a, critic_a), (b, actor_b, critic_b) = runs[False], runs[True]
    for key in ("policy_loss", "value_loss", "grad_norm", "clipfrac", "approx_kl", "score_mean", "kl"):
        assert torch.isfinite(torch.tensor(b[key])), key
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert a["grad_norm"] > 0  # an update happened, so the comparison below compares something
    assert actor_a.keys() == actor_b.keys() and critic_a.keys() == critic_b.keys()
    for name in actor_a:
        torch.testing.assert_close(actor_b[name], actor_a[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in critic_a:
        torch.testing.assert_close(critic_b[name], critic_a[name], rtol=1e-5, atol=1e-7, msg=name)


def _forward_backward(trainer, counts):
    """One update-style forward and backward of actor and critic; counts q_proj calls in each phase."""
    cfg = trainer.config
    seq = torch.randint(4, 30, (2, 9))
    attn = torch.ones_like(seq)
    attn[0, :2] = 0
    pos = fastppo.train.models.position_ids_from(attn)
    mask = torch.ones(2, 5, dtype=torch.bool)
    lp, _ = response_logprobs(trainer.actor, seq, attn, pos, 4, mask, 1.0, cfg.fused_head)
    v = trainer.critic(seq, attn, pos, 3, -1)
    counts["phase"] = "backward"
    (lp.sum() + v.sum()).backward()


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_layers_in_backward_only_when_grads_are_built(tmp_path, lora_r):
    for gc in (False, True):
        trainer = PPOTrainer(small(tmp_path / str(gc), lora_r=lora_r, gradient_checkpointing=gc))
        counts = {"phase": "forward", "forward": 0, "backward": 0}

        def hook(module, args, output):
            counts[counts["phase"]] += 1

        # A layer near the start of each decoder layer: the recompute stops early once it has rebuilt
        # the last tensor backward needs, so a hook on a whole block (mlp) would not see it finish.
        handles = [m.register_forward_hook(hook) for model in (trainer.actor, trainer.critic)
                   for name, m in model.named_modules() if name.endswith("q_proj")]
        _forward_backward(trainer, counts)
        # 2 layers in each of actor and critic: each runs once forward; checkpointed, once again in backward.
        assert counts["forward"] == 4
        assert counts["backward"] == (4 if gc else 0), gc
        # Outside a graph (rollout, generation) nothing is recomputed and the KV cache still works.
        counts.update(phase="forward", forward=0, backward=0)
        with torch.no_grad():
            out = trainer.actor(input_ids=torch.tensor([[1, 5, 6]]), use_cache=True)
        assert out.past_key_values is not None and counts["forward"] == 2
        for h in handles:
            h.remove()
        # The layers are back in eval mode: dropout stays off for the PPO ratio.
        assert not any(m.training for m in trainer.actor.modules())
        assert not any(m.training for m in trainer.critic.modules())
        for p in trainer.actor.parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all()


def test_gradient_checkpointing_saves_fewer_activations(tmp_path):
    """Bytes autograd keeps for backward during the actor's update forward: fewer when checkpointed."""
    saved = {}
    for gc in (False, True):
        trainer = PPOTrainer(small(tmp_path / str(gc), gradient_checkpointing=gc, max_new_tokens=16))
        seq = torch.randint(4, 30, (4, 40))
        attn = torch.ones_like(seq)
        pos = fastppo.train.models.position_ids_from(attn)
        mask = torch.ones(4, 16, dtype=torch.bool)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, _ = response_logprobs(trainer.actor, seq, attn, pos, 24, mask, 1.0, True)
        lp.sum().backward()
        saved[gc] = total[0]
    assert saved[True] < 0.7 * saved[False], saved


# --------------------------------------------------------------------------------------------
# LoRA critic

def test_lora_critic_trains_only_the_adapter_and_the_whole_value_head(tmp_path):
    r = 4
    # Two updates: the value head starts at zero, so the adapter behind it gets a gradient from the second on.
    trainer = PPOTrainer(small(tmp_path, critic_lora_r=r, critic_lora_alpha=8, mini_batch_size=4))
    mc = builtin.build_model_config()
    h, inter, layers = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    kv = mc.num_key_value_heads * (h // mc.num_attention_heads)
    # all-linear: q, k, v, o, gate, up, down in each layer get A [r, in] and B [out, r]; plus the value
    # head [1, h] trained whole. The built-in model: 2 * 4 * (128 + 128 + 128 + 128 + 192 + 192 + 192) + 64.
    per_layer = r * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + inter) + (h + inter) + (inter + h))
    expected = layers * per_layer + h
    assert expected == 8768
    trainable = {n: p for n, p in trainer.critic.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("lora_" in n or "score" in n for n in trainable)
    group = trainer.optimizer.param_groups[1]["params"]
    assert sum(p.numel() for p in group) == expected
    # The full critic is much larger; the actor is untouched by the critic's LoRA.
    assert sum(p.numel() for p in trainer.critic.parameters()) > 10 * expected
    assert all(p.requires_grad for p in trainer.actor.parameters())

    frozen = {n: p.detach().clone() for n, p in trainer.critic.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    row = trainer.iteration()
    assert torch.isfinite(torch.tensor([row["policy_loss"], row["value_loss"]])).all()
    for n, p in trainer.critic.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    head = [n for n in trainable if "score" in n]
    assert len(head) == 1 and not torch.equal(trainable[head[0]], before[head[0]])  # the head learned
    assert any(not torch.equal(trainable[n], before[n]) for n in trainable if "lora_B" in n)


def test_lora_critic_from_a_reward_model_keeps_its_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_dir, prompts = builtin.materialize(str(tmp_path / "assets"), seed=0)
    torch.manual_seed(7)
    rm = AutoModelForSequenceClassification.from_config(builtin.build_model_config(num_labels=1))
    rm.save_pretrained(tmp_path / "rm")
    builtin.build_tokenizer().save_pretrained(tmp_path / "rm")
    trainer = PPOTrainer(small(tmp_path / "out", model=model_dir, dataset=prompts, reward=None,
                               reward_model=str(tmp_path / "rm"), critic_lora_r=2))
    torch.testing.assert_close(trainer.critic.head(torch.eye(64)).squeeze(1), rm.score.weight[0])
    assert trainer.critic.head.modules_to_save["default"].weight.requires_grad


def test_lora_critic_checkpoint_loads_with_peft_and_resumes(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    kw = dict(critic_lora_r=4, critic_lora_alpha=8, lora_r=4, gradient_checkpointing=True)
    PPOTrainer(small(straight, iterations=3, **kw)).train()
    PPOTrainer(small(cut, iterations=2, save_every=1, **kw)).train()
    critic_dir = cut / "checkpoints" / "step-00000002" / "critic"
    assert (critic_dir / "adapter_model.safetensors").is_file()
    assert not (critic_dir / "model.safetensors").exists()  # the adapter only, not a second full model

    # Gradient checkpointing changes no number, so a run may resume with it switched off.
    resumed = PPOTrainer(small(cut, iterations=3, resume=True, **dict(kw, gradient_checkpointing=False)))
    assert resumed.step == 2
    resumed.train()
    a, b = _metrics(straight), _metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("score_mean", "kl", "policy_loss", "value_loss", "value_mean"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)

    # The saved critic loads back with peft on its base and gives the trainer's values.
    base_dir = os.path.join(straight, "builtin", "model-seed3")
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    loaded = PeftModel.from_pretrained(base, straight / "checkpoints" / "step-00000003" / "critic").eval()
    trainer = PPOTrainer(small(straight, iterations=3, resume=True, **kw))
    seq = torch.tensor([[1, 5, 6, 7, 8]])
    attn = torch.ones_like(seq)
    pos = fastppo.train.models.position_ids_from(attn)
    with torch.no_grad():
        want = trainer.critic(seq, attn, pos)
        got = loaded(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, 0]
    torch.testing.assert_close(got, want[:, -1], rtol=1e-5, atol=1e-6)


def test_critic_lora_is_refused_without_a_critic_and_flags_exist(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"critic_lora_r .* uses no critic"):
        small(tmp_path, advantage_estimator="grpo", num_generations=2, critic_lora_r=4).check()
    with pytest.raises(ConfigError, match=r"critic_lora_r \(--critic-lora-r\) must be an integer >= 0"):
        small(tmp_path, critic_lora_r=-1).check()
    from fastppo.cli import main

    rc = main(["train", "--critic-lora-r", "-2", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "critic_lora_r" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--gradient-checkpointing" in out and "--critic-lora-r" in out and "--critic-lora-alpha" in out


def test_checkpoints_from_before_the_switches_still_resume_and_a_critic_lora_change_is_refused():
    from fastppo.train import checkpoint

    new = {"options": {"critic_lora_r": 0, "critic_lora_alpha": 16, "lr": 1}, "actor": None, "critic": None,
           "reward_model": None, "prompts": {"count": 1}}
    old = {"options": {"lr": 1}, "actor": None, "critic": None, "reward_model": None, "prompts": {"count": 1}}
    assert checkpoint._differences(old, new) == []  # written before critic_lora_r existed: read as 0
    assert "gradient_checkpointing" in checkpoint.RUNTIME_OPTIONS
    changed = dict(new, options=dict(new["options"], critic_lora_r=4))
    assert checkpoint._differences(old, changed) == ["critic_lora_r is 4 now, was 0"]


def test_switches_apply_to_models_given_in_memory(tmp_path):
    """PPOTrainer(config, model=..., reward_model=...) as TRL users call it: the critic (a copy of the
    in-memory reward model) gets its LoRA adapter, and both models checkpoint their layers."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fastppo.train import PPOConfig
    from fastppo.train.models import _CHECKPOINTED

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(builtin.build_model_config())
    rm = AutoModelForSequenceClassification.from_config(builtin.build_model_config(num_labels=1))
    rm_head = rm.score.weight.detach().clone()
    cfg = PPOConfig(output_dir=str(tmp_path / "run"), iterations=1, batch_size=8, mini_batch_size=4,
                    micro_batch_size=4, max_new_tokens=4, ppo_epochs=1, progress=False, plot=False,
                    critic_lora_r=2, gradient_checkpointing=True)
    trainer = PPOTrainer(cfg, model=policy, reward_model=rm, tokenizer=builtin.build_tokenizer(),
                         train_dataset=datasets.Dataset.from_dict({"prompt": builtin.prompts()[:16]}))
    assert hasattr(trainer.critic.model, "peft_config")
    trainable = sum(p.numel() for p in trainer.critic.parameters() if p.requires_grad)
    assert trainable == 2 * 2 * (4 * 128 + 3 * 192) + 64  # r=2 on 7 linear layers x 2 layers, plus the head
    assert len(getattr(trainer.actor, _CHECKPOINTED)) == 2 and len(getattr(trainer.critic.model, _CHECKPOINTED)) == 2
    torch.testing.assert_close(trainer.critic.head(torch.eye(64)).squeeze(1), rm_head[0])
    row = trainer.iteration()
    assert torch.isfinite(torch.tensor([row["policy_loss"], row["value_loss"]])).all()
    assert torch.equal(rm.score.weight, rm_head)  # the reward model itself stays frozen
    trainer.train()
    assert (tmp_path / "run" / "critic" / "adapter_model.safetensors").is_file()  # the final critic: adapter only
