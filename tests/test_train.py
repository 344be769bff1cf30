"""The PPO engine end to end on tiny local models (CPU, no download, fixed seeds)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from fastppo.train import ConfigError, PPOConfig, PPOTrainer  # noqa: E402
from fastppo.train import builtin  # noqa: E402
from fastppo.train.models import position_ids_from, response_logprobs  # noqa: E402
from fastppo.train.data import encode_prompts, left_pad  # noqa: E402

# The ops are exercised through the reference here: the trainer's wiring is under test, not the
# kernels (which have their own tests), and the interpreter would make every step slow.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("torch_backend")]



@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The built-in model, tokenizer and prompts, written once for the module."""
    root = tmp_path_factory.mktemp("builtin")
    model_dir, prompts_file = builtin.materialize(str(root), seed=0)
    return {"model": model_dir, "prompts": prompts_file, "root": root}


def small(out, **kw) -> PPOConfig:
    """A quick configuration of the built-in task."""
    base = dict(output_dir=str(out), iterations=2, batch_size=16, mini_batch_size=8, micro_batch_size=4,
                max_new_tokens=6, ppo_epochs=1, progress=False, plot=False)
    if "reward_model" in kw:
        base["reward"] = None
    base.update(kw)
    return builtin.default_config(**base)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------

def test_builtin_task_learns(tmp_path):
    cfg = builtin.default_config(output_dir=str(tmp_path), iterations=20, batch_size=32, mini_batch_size=16,
                                 micro_batch_size=16, max_new_tokens=8, progress=False, seed=0)
    summary = PPOTrainer(cfg).train()
    rows = summary["history"]
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("step", "score_mean", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
                "explained_variance", "response_length", "time_generate", "time_backward", "tokens_per_s",
                "peak_memory_mb"):
        assert key in rows[0], key
    first = sum(r["score_mean"] for r in rows[:3]) / 3
    last = sum(r["score_mean"] for r in rows[-3:]) / 3
    # A random policy scores ~0 (as many positive as negative words); learning pushes towards 1.
    # Over seeds 0-4 this config goes from ~0.03 to ~0.78; the margin leaves room for numerics.
    assert abs(first) < 0.2
    assert last > first + 0.4, (first, last)
    assert last > 0.5
    assert rows[-1]["kl"] > 0
    assert os.path.getsize(summary["plot"]) > 1000
    with open(summary["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_first_update_has_ratio_one(tmp_path):
    """Old log-probs come from the same function the update differentiates: ratio = 1 at first."""
    cfg = small(tmp_path, iterations=1, learning_rate=1e-30, critic_learning_rate=1e-30)
    row = PPOTrainer(cfg).iteration()
    assert row["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert row["clipfrac"] == 0.0
    assert row["kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the untouched starting model


def test_generation_left_padding_and_eos(tmp_path):
    trainer = PPOTrainer(small(tmp_path, max_new_tokens=10))
    ids, attn = left_pad([[1, 5, 6, 7], [1, 9]], trainer.tokenizer.pad_token_id, trainer.device)
    assert ids[1].tolist()[:2] == [0, 0] and attn[1].tolist() == [0, 0, 1, 1]
    assert position_ids_from(attn)[1].tolist() == [0, 0, 0, 1]

    # Every prompt once: with ~1/36 chance of EOS per token, many rows stop early.
    ids, attn = left_pad(trainer.prompt_ids, trainer.tokenizer.pad_token_id, trainer.device)
    torch.manual_seed(0)
    resp, mask = trainer.generate(ids, attn)
    eos, pad = trainer.tokenizer.eos_token_id, trainer.tokenizer.pad_token_id
    assert resp.shape[1] <= 10
    stopped = 0
    for r, m in zip(resp, mask):
        n = int(m.sum())
        assert n >= 1 and m[:n].all() and not m[n:].any()  # one contiguous run from the start
        hit = (r[:n] == eos).nonzero()
        if len(hit):
            stopped += 1
            assert hit[0].item() == n - 1  # the first EOS is the last response token
            assert (r[n:] == pad).all()
        else:
            assert n == resp.shape[1]
    assert stopped > 10


def test_lora_reference_is_adapter_disabled(tmp_path, assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = small(tmp_path, model=assets["model"], dataset=assets["prompts"], reward="sentiment", lora_r=4,
                lora_alpha=8, learning_rate=1e-2)
    trainer = PPOTrainer(cfg)
    assert trainer.reference is None  # no second copy of the weights
    before = {n: p.detach().clone() for n, p in trainer.actor.named_parameters()}
    summary = trainer.train()

    changed = {n for n, p in trainer.actor.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(not p.requires_grad for n, p in trainer.actor.named_parameters() if "lora_" not in n)

    # The reference log-probs are exactly those of the untouched base model.
    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    ids, attn = left_pad(trainer.prompt_ids[:4], trainer.tokenizer.pad_token_id, trainer.device)
    torch.manual_seed(1)
    resp, mask = trainer.generate(ids, attn)
    seq = torch.cat([ids, resp], 1)
    full = torch.cat([attn, mask.long()], 1)
    pos = position_ids_from(full)
    with torch.no_grad():
        with trainer.actor.disable_adapter():
            ref, _ = response_logprobs(trainer.actor, seq, full, pos, ids.shape[1], mask, 1.0)
        want, _ = response_logprobs(base, seq, full, pos, ids.shape[1], mask, 1.0)
        now, _ = response_logprobs(trainer.actor, seq, full, pos, ids.shape[1], mask, 1.0)
    torch.testing.assert_close(ref, want)
    assert not torch.allclose(now, want)

    # The checkpoint holds only the adapter, and peft loads it back onto the base model.
    actor_dir = os.path.join(summary["checkpoint"], "actor")
    assert os.path.isfile(os.path.join(actor_dir, "adapter_config.json"))
    assert not os.path.isfile(os.path.join(actor_dir, "model.safetensors"))
    loaded = PeftModel.from_pretrained(base, actor_dir).eval()
    with torch.no_grad():
        again, _ = response_logprobs(loaded, seq, full, pos, ids.shape[1], mask, 1.0)
    torch.testing.assert_close(again, now)


def _save_reward_model(path, seed=3):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = builtin.build_model_config(num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    builtin.build_tokenizer().save_pretrained(path)
    return model.eval()


def test_reward_model_path_and_critic_init(tmp_path, assets):
    from transformers import AutoModelForSequenceClassification

    rm_dir = str(tmp_path / "rm")
    rm = _save_reward_model(rm_dir)
    cfg = small(tmp_path / "out", model=assets["model"], dataset=assets["prompts"], reward_model=rm_dir)
    trainer = PPOTrainer(cfg)

    # The critic starts as the reward model: same backbone and head.
    rm_state = rm.state_dict()
    for name, p in trainer.critic.model.state_dict().items():
        torch.testing.assert_close(p, rm_state[name], msg=name)

    # Scores are the reward model's output at the last response token.
    ids, attn = left_pad(trainer.prompt_ids[:3], trainer.tokenizer.pad_token_id, trainer.device)
    resp, mask = trainer.generate(ids, attn)
    seq, full = torch.cat([ids, resp], 1), torch.cat([attn, mask.long()], 1)
    pos = position_ids_from(full)
    scores = trainer.score([None] * 3, seq, full, pos, resp, mask)
    for b in range(3):
        keep = full[b].bool()
        with torch.no_grad():  # the unpadded sequence through the plain model, read at its end
            want = rm.score(rm.model(input_ids=seq[b][keep][None]).last_hidden_state)[0, -1, 0]
        torch.testing.assert_close(scores[b], want, rtol=1e-4, atol=1e-4)

    summary = trainer.train()
    assert all(torch.isfinite(torch.tensor(r["score_mean"])) for r in summary["history"])
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(summary["checkpoint"], "critic"))
    assert critic.config.num_labels == 1
    assert not torch.allclose(critic.score.weight, rm.score.weight)  # the critic was trained
    for p in trainer.reward_model.parameters():
        assert not p.requires_grad


def test_resume_continues_with_same_state(tmp_path):
    straight = tmp_path / "straight"
    cut = tmp_path / "cut"
    PPOTrainer(small(straight, iterations=4)).train()

    first = PPOTrainer(small(cut, iterations=2, save_every=1))
    first.train()
    names = sorted(os.listdir(cut / "checkpoints"))
    assert names == ["step-00000001", "step-00000002"]  # no temporary directory left behind

    resumed = PPOTrainer(small(cut, iterations=4, resume=True))
    assert resumed.step == 2 and resumed.resumed_from.endswith("step-00000002")
    assert resumed.scheduler.last_epoch == first.scheduler.last_epoch
    resumed.train()

    a, b = _metrics(straight), _metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("score_mean", "kl", "policy_loss", "value_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)

    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(straight / "checkpoints" / "step-00000004" / "actor").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(cut / "checkpoints" / "step-00000004" / "actor").state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)
    from fastppo.train import safestate

    sa, sb = (safestate.load(str(d / "checkpoints" / "step-00000004" / "trainer_state.json"),
                             str(d / "checkpoints" / "step-00000004" / "trainer_state.safetensors"))
              for d in (straight, cut))
    assert sa["step"] == sb["step"] == 4
    assert sa["scheduler"] == sb["scheduler"]


# --------------------------------------------------------------------------------------------
# configuration

def test_config_file_and_flags(tmp_path):
    from fastppo.cli import build_parser
    from fastppo.train.cli import resolve_config

    yml = tmp_path / "c.yaml"
    yml.write_text("batch_size: 8\nmini-batch-size: 4\nclip_high: 0.28\n")
    toml = tmp_path / "c.toml"
    toml.write_text("batch_size = 8\nmini_batch_size = 4\nlearning_rate = 3e-4\n")
    assert PPOConfig.from_file(yml).clip_high == 0.28
    assert PPOConfig.from_file(toml, learning_rate=None).learning_rate == 3e-4

    args = build_parser().parse_args(["train", "--config", str(yml), "--batch-size", "16", "--clip-high", "none",
                                      "--no-whiten-advantages", "--micro-batch-size", "2"])
    cfg = resolve_config(args)
    assert (cfg.batch_size, cfg.mini_batch_size, cfg.micro_batch_size) == (16, 4, 2)
    assert cfg.clip_high is None and cfg.whiten_advantages is False
    assert cfg.reward == "sentiment"  # no model: the built-in task's defaults fill the rest

    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sise: 8\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        PPOConfig.from_file(bad)


@pytest.mark.parametrize("changes, match", [
    (dict(batch_size=10, mini_batch_size=4), "multiple of mini_batch_size"),
    (dict(mini_batch_size=8, micro_batch_size=3), "multiple of micro_batch_size"),
    (dict(model="/nonexistent/model"), "does not exist"),
    (dict(dataset="/nonexistent/prompts.jsonl"), "does not exist"),
    (dict(top_p=1.5), "top_p"),
    (dict(reward="no-such-reward"), "unknown built-in reward"),
])
def test_bad_configuration_fails_early(tmp_path, changes, match):
    cfg = small(tmp_path).replace(**changes)
    with pytest.raises(ConfigError, match=match):
        PPOTrainer(cfg)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_reward_model_with_other_tokenizer_is_rejected(tmp_path, assets):
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    rm_dir = str(tmp_path / "rm")
    AutoModelForSequenceClassification.from_config(builtin.build_model_config(num_labels=1)).save_pretrained(rm_dir)
    vocab = {w: i for i, w in enumerate(reversed(builtin.VOCAB))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(rm_dir)
    cfg = small(tmp_path / "out", model=assets["model"], dataset=assets["prompts"], reward_model=rm_dir)
    cfg = cfg.replace(reward=None)
    with pytest.raises(ConfigError, match="different tokenizer"):
        PPOTrainer(cfg)

    missing = small(tmp_path / "out", model=assets["model"], dataset=assets["prompts"]).replace(reward=None)
    with pytest.raises(ConfigError, match="needs a reward"):
        PPOTrainer(missing)


def test_dataset_column_and_chat_template(tmp_path, assets):
    two = tmp_path / "two.csv"  # two text columns: which one holds the prompts is not guessed
    two.write_text("title,text\nx,the movie was\ny,this film is\n")
    cfg = small(tmp_path / "out", model=assets["model"], dataset=str(two), reward="sentiment", batch_size=4,
                mini_batch_size=4)
    with pytest.raises(ConfigError, match="no column 'prompt'.*more than one text column"):
        PPOTrainer(cfg)
    assert PPOTrainer(cfg.replace(prompt_column="text")).prompts == ["the movie was", "this film is"]
    csv = tmp_path / "p.csv"  # one text column (the other holds numbers): it is the prompt column
    csv.write_text("id,text\n1,the movie was\n2,this film is\n")
    trainer = PPOTrainer(cfg.replace(dataset=str(csv)))
    assert trainer.prompts == ["the movie was", "this film is"]
    row = trainer.iteration()  # fewer prompts than batch_size: the sampler cycles
    assert row["step"] == 1

    tok = builtin.build_tokenizer()
    tok.chat_template = "{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}movie{% endif %}"
    ids = encode_prompts(tok, ["it was", [{"role": "user", "content": "so"}]], max_length=16)
    assert tok.convert_ids_to_tokens(ids[0]) == ["<bos>", "it", "was", "movie"]
    assert tok.convert_ids_to_tokens(ids[1]) == ["<bos>", "so", "movie"]


def test_cli_train_prints_first_and_last_score(tmp_path, capsys):
    from fastppo.cli import main

    rc = main(["train", "--output-dir", str(tmp_path), "--iterations", "2", "--batch-size", "8",
               "--mini-batch-size", "8", "--micro-batch-size", "8", "--max-new-tokens", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mean score: first iteration" in out and "-> last iteration" in out
    assert len(_metrics(tmp_path)) == 2

    rc = main(["train", "--output-dir", str(tmp_path), "--batch-size", "10", "--mini-batch-size", "4"])
    assert rc == 2
    assert "multiple of mini_batch_size" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from fastppo.train import checkpoint

    trainer = PPOTrainer(small(tmp_path, iterations=1))
    trainer.train()
    good = checkpoint.latest_checkpoint(str(tmp_path))
    assert good.endswith("step-00000001")

    trainer.step = 2

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_state", crash)  # dies after the weights, before the trainer state
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert checkpoint.latest_checkpoint(str(tmp_path)) == good
    assert sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("step-")) == ["step-00000001"]


def test_kl_controller_and_attention_choice():
    from fastppo.train import KLController
    from fastppo.train.models import pick_attention

    fixed = KLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=1.0, horizon=100)
    adaptive.update(5.0, 10)  # far above target: error clipped at +20%, scaled by 10/100
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(0.5, 10)  # below target by half: error -0.2 after clipping
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)

    assert pick_attention(PPOConfig(), torch.device("cpu")) == "sdpa"
    assert pick_attention(PPOConfig(attn_implementation="eager"), torch.device("cpu")) == "eager"


def test_kv_cache_keyword_follows_the_models_output():
    """transformers >= 5.25 takes and returns ``cache``; older versions ``past_key_values``.
    Worked: a 5.25 output carrying cache C hands {"cache": C} to the next step."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    from fastppo.train.trainer import _kv_cache

    marker = object()
    fields = CausalLMOutputWithPast.__dataclass_fields__
    name = "cache" if "cache" in fields else "past_key_values"
    assert _kv_cache(CausalLMOutputWithPast(**{name: marker})) == {name: marker}

    @dataclasses.dataclass
    class OldOutput:  # the output of a transformers before 5.25
        past_key_values: object = None

    assert _kv_cache(OldOutput(marker)) == {"past_key_values": marker}


@pytest.mark.filterwarnings("error:`past_key_values` is deprecated:FutureWarning")
def test_generation_uses_the_current_cache_keyword(tmp_path):
    cfg = builtin.default_config(output_dir=str(tmp_path / "run"), iterations=1, batch_size=4, mini_batch_size=4,
                                 micro_batch_size=4, max_new_tokens=3, ppo_epochs=1, progress=False, plot=False)
    PPOTrainer(cfg).train()
