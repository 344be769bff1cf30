"""``PPOTrainer`` as TRL users call it, and the run directory a recipe's next step reads.

In-memory models, tokenizer, ``datasets.Dataset`` and peft config; tokenised and chat datasets;
the prompt column found; a reward model saved without its tokenizer; the final policy in
``output_dir`` loaded back with ``AutoPeftModelForCausalLM`` / ``AutoModelForCausalLM`` from another
working directory; one run per directory (``overwrite``); chat-template detection; stop token;
missing-EOS penalty; YAML numbers. Tiny models built from configs, one or two iterations each.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from fastppo.train import ConfigError, PPOConfig, PPOTrainer, validate  # noqa: E402
from fastppo.train import builtin  # noqa: E402
from fastppo.train.data import encode_prompts, has_chat_template, left_pad  # noqa: E402
from fastppo.train.models import position_ids_from, response_logprobs  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"), pytest.mark.usefixtures("torch_backend")]

EOS = builtin.VOCAB.index("<eos>")
PROMPTS = builtin.prompts()[::30]  # 8 prompts



@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    model_dir, prompts_file = builtin.materialize(str(root), seed=0)
    return {"model": model_dir, "prompts": prompts_file, "root": root}


QUICK = dict(iterations=1, batch_size=4, mini_batch_size=4, micro_batch_size=4, max_new_tokens=4, ppo_epochs=1,
             max_prompt_length=16, learning_rate=1e-2, num_threads=1, progress=False, plot=False)


def quick(out, **kw) -> PPOConfig:
    """A short run with PPOConfig's own defaults (no reward source: the test gives one)."""
    return PPOConfig(**{**QUICK, "output_dir": str(out), **kw})


def task(out, **kw) -> PPOConfig:
    """A short run of the built-in task (its model, prompts and sentiment reward unless replaced)."""
    return builtin.default_config(**{**QUICK, "output_dir": str(out), **kw})


def policy(seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(builtin.build_model_config())


def scorer(seed=3, **config):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(builtin.build_model_config(num_labels=1, **config))
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    return model


def chat_tokenizer():
    tok = builtin.build_tokenizer()
    tok.chat_template = ("{% for m in messages %}<bos> {{ m['content'] }} <eos> {% endfor %}"
                         "{% if add_generation_prompt %}<bos> movie {% endif %}")
    return tok


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


# --------------------------------------------------------------------------------------------
# item 7: what TRL users hold

def test_in_memory_models_dataset_and_peft_config_as_trl_passes_them(tmp_path, capsys):
    from peft import LoraConfig

    rm, vm = scorer(3), scorer(4)
    rm_before, vm_before = state(rm), state(vm)
    trainer = PPOTrainer(
        args=quick(tmp_path / "run", iterations=2), processing_class=builtin.build_tokenizer(), model=policy(),
        ref_model=None, reward_model=rm, value_model=vm, train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert trainer.reference is None  # LoRA: the reference is the adapter switched off
    assert trainer.reward_model.model is rm and trainer.critic.model is vm
    assert trainer.prompts == PROMPTS
    actor_before = state(trainer.actor)

    # Scores are the in-memory reward model's output at the last response token.
    ids, attn = left_pad(trainer.prompt_ids[:2], trainer.tokenizer.pad_token_id, trainer.device)
    resp, mask = trainer.generate(ids, attn)
    seq, full = torch.cat([ids, resp], 1), torch.cat([attn, mask.long()], 1)
    scores = trainer.score([None] * 2, seq, full, position_ids_from(full), resp, mask)
    for b in range(2):
        with torch.no_grad():
            want = rm(input_ids=seq[b][full[b].bool()][None]).logits[0, 0]
        torch.testing.assert_close(scores[b], want, rtol=1e-4, atol=1e-4)

    summary = trainer.train()
    assert [r["step"] for r in summary["history"]] == [1, 2]
    assert not changed(rm_before, rm)  # frozen
    assert changed(vm_before, vm)  # the value model is the critic being trained
    moved = changed(actor_before, trainer.actor)
    assert moved and all("lora_" in k for k in moved)
    # Built in memory, the base has no directory to name: the adapter is written, with a note saying so.
    assert os.path.isfile(tmp_path / "run" / "adapter_config.json")
    assert "names no base model" in capsys.readouterr().err


def test_positional_reward_fn_full_model_and_list_of_dicts(tmp_path, capsys):
    seen = []

    def reward(prompts, completions):
        seen.extend(prompts)
        return [float(len(c.split())) for c in completions]

    rows = [{"id": i, "question": p} for i, p in enumerate(PROMPTS)]  # one text column: the prompts
    actor = policy()
    trainer = PPOTrainer(quick(tmp_path / "run"), reward, model=actor, tokenizer=builtin.build_tokenizer(),
                         train_dataset=rows)
    assert "prompts come from its 'question' column" in capsys.readouterr().err
    assert trainer.prompts == PROMPTS
    assert trainer.reference is not None and trainer.reference is not trainer.actor
    # No value model and no reward model: the critic is the policy's backbone with a zero head.
    for name, p in trainer.critic.model.model.state_dict().items():
        torch.testing.assert_close(p, actor.model.state_dict()[name], msg=name)
    assert not trainer.critic.head.weight.any()
    ref_before = state(trainer.reference)
    trainer.train()
    assert seen and set(seen) <= set(PROMPTS)
    assert not changed(ref_before, trainer.reference)

    with pytest.raises(ConfigError, match="more than one text column"):
        PPOTrainer(quick(tmp_path / "two"), reward, model=policy(), tokenizer=builtin.build_tokenizer(),
                   train_dataset=[{"a": p, "b": p} for p in PROMPTS])
    with pytest.raises(ConfigError, match="needs its tokenizer"):
        PPOTrainer(quick(tmp_path / "two"), reward, model=policy(), train_dataset=rows)


def test_tokenised_dataset_is_used_as_it_is(tmp_path):
    tok = builtin.build_tokenizer()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "lengths": [len(i) for i in ids]})  # as TRL's recipe maps it
    seen = []

    def reward(prompts, completions):
        seen.extend(prompts)
        return [0.0] * len(completions)

    trainer = PPOTrainer(task(tmp_path / "run", reward=None), reward,
                         train_dataset=ds)
    assert trainer.prompt_ids == ids
    trainer.iteration()
    assert seen and set(seen) <= set(PROMPTS)  # the reward function reads the decoded prompt text
    with pytest.raises(ConfigError, match="token id 99, but the tokenizer has 40 tokens"):
        PPOTrainer(task(tmp_path / "bad", reward=None), reward, train_dataset=[{"input_ids": [1, 99]}])
    with pytest.raises(ConfigError, match=r"one split.*dataset\['train'\]"):
        PPOTrainer(task(tmp_path / "bad", reward=None), reward, train_dataset=datasets.DatasetDict({"train": ds}))


def test_messages_dataset_keeps_the_conversation_up_to_the_last_user_turn(tmp_path):
    tok = chat_tokenizer()
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": "good"}] for p in PROMPTS]
    trainer = PPOTrainer(task(tmp_path / "run"), tokenizer=tok,
                         train_dataset=datasets.Dataset.from_dict({"messages": convs}))
    want = [tok(tok.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for c in convs]
    assert trainer.prompt_ids == want
    assert tok.convert_ids_to_tokens(want[0]) == ["<bos>", *PROMPTS[0].split(), "<eos>", "<bos>", "movie"]


def test_reward_model_saved_without_its_tokenizer(tmp_path, assets):
    rm_dir = str(tmp_path / "rm")
    scorer().save_pretrained(rm_dir)  # what a trainer that never saw the tokenizer leaves
    cfg = quick(tmp_path / "run", model=assets["model"], dataset=assets["prompts"], reward_model=rm_dir)
    trainer = PPOTrainer(cfg)
    assert trainer.iteration()["step"] == 1

    small = str(tmp_path / "rm-small")
    scorer(vocab_size=30).save_pretrained(small)
    with pytest.raises(ConfigError, match="no tokenizer of its own and embeds 30 token ids.*vocab_size 40"):
        validate(cfg.replace(reward_model=small))

    # A tokenizer that only adds a token of its own reads the actor's ids the same way.
    extra = str(tmp_path / "rm-extra")
    scorer(vocab_size=41).save_pretrained(extra)
    tok = builtin.build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    tok.save_pretrained(extra)
    validate(cfg.replace(reward_model=extra))

    with pytest.raises(ConfigError, match="embeds 30 token ids but the policy can produce 40"):
        PPOTrainer(quick(tmp_path / "mem"), model=policy(), tokenizer=builtin.build_tokenizer(),
                   reward_model=scorer(vocab_size=30), train_dataset=[{"prompt": p} for p in PROMPTS])


# --------------------------------------------------------------------------------------------
# item 8: the run directory

def _logprobs(model, tok, texts):
    ids, attn = left_pad([tok(t)["input_ids"] for t in texts], tok.pad_token_id, torch.device("cpu"))
    resp = torch.full((len(texts), 3), builtin.VOCAB.index("good"))
    mask = torch.ones_like(resp, dtype=torch.bool)
    seq, full = torch.cat([ids, resp], 1), torch.cat([attn, mask.long()], 1)
    with torch.no_grad():
        return response_logprobs(model, seq, full, position_ids_from(full), ids.shape[1], mask, 1.0)[0]


def test_output_dir_loads_with_auto_classes_from_any_directory(tmp_path, assets, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(assets["model"], work / "base")
    monkeypatch.chdir(work)  # the run names its model and output relatively
    cfg = task("run", model="base", dataset=assets["prompts"], reward="sentiment", lora_r=4,
               lora_alpha=8)
    trainer = PPOTrainer(cfg)
    trainer.train()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = str(work / "run")
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == str(work / "base")
    assert not os.path.exists(os.path.join(out, "README.md"))  # peft's model card is not written over a user's
    loaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    texts = PROMPTS[:3]
    torch.testing.assert_close(_logprobs(loaded, tok, texts), _logprobs(trainer.actor, trainer.tokenizer, texts))
    merged = loaded.merge_and_unload()
    batch = tok(texts[:1], return_tensors="pt")
    gen = merged.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > batch["input_ids"].shape[1]
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "critic"))
    for name, p in critic.state_dict().items():
        torch.testing.assert_close(p, trainer.critic.model.state_dict()[name], msg=name)

    # The full model (no LoRA) goes to the same place and loads with AutoModelForCausalLM.
    full = PPOTrainer(task(tmp_path / "full"))
    full.train()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).eval()
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, full.actor.state_dict()[name], msg=name)
    gen = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > batch["input_ids"].shape[1]


def test_a_new_run_never_mixes_with_another_runs_directory(tmp_path, capsys):
    out = tmp_path / "run"
    PPOTrainer(task(out, iterations=2, save_every=1)).train()
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000001", "step-00000002"]
    again = task(out, lora_r=4)
    with pytest.raises(ConfigError, match=r"holds another run \(checkpoints, critic, metrics.jsonl, "
                                          r"model.safetensors\); pass --resume .* --overwrite"):
        PPOTrainer(again)
    with pytest.raises(ConfigError, match="give one of them"):
        PPOTrainer(again.replace(overwrite=True, resume=True))
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    PPOTrainer(again.replace(overwrite=True)).train()
    assert "removed the previous run's" in capsys.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000001"]
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1]
    assert not os.path.exists(out / "model.safetensors")  # the LoRA run left its adapter, not the old full model
    assert os.path.isfile(out / "adapter_model.safetensors")
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is cleared


def test_output_dir_may_not_be_a_model_it_reads(tmp_path, assets):
    cfg = task(assets["model"], model=assets["model"], dataset=assets["prompts"], overwrite=True)
    for c in (cfg, cfg.replace(overwrite=False)):
        with pytest.raises(ConfigError, match="is where model is read from"):
            PPOTrainer(c)
    assert os.path.isfile(os.path.join(assets["model"], "model.safetensors"))  # --overwrite removed nothing


@pytest.mark.parametrize("lora", [False, True], ids=["full", "peft_config"])
def test_in_memory_run_resumes_and_refuses_another_model(tmp_path, lora):
    from peft import LoraConfig

    kw = dict(tokenizer=builtin.build_tokenizer(), train_dataset=[{"prompt": p} for p in PROMPTS],
              reward_model=scorer())
    if lora:
        kw["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    first = PPOTrainer(quick(tmp_path / "run"), model=policy(0), **kw)
    first.train()
    if lora:  # the config records the adapter, as --lora-r would
        assert (first.config.lora_r, first.config.lora_alpha, first.config.lora_target_modules) == (4, 8, "q_proj,v_proj")
    resumed = PPOTrainer(quick(tmp_path / "run", iterations=2, resume=True), model=policy(0), **kw)
    assert resumed.step == 1
    for name, p in resumed.actor.state_dict().items():  # the checkpoint's weights, adapter or whole model
        torch.testing.assert_close(p, first.actor.state_dict()[name], msg=name)
    with pytest.raises(ConfigError, match="actor model differs"):
        PPOTrainer(quick(tmp_path / "run", iterations=2, resume=True), model=policy(1), **kw)


def test_chat_template_is_not_applied_twice():
    tok = chat_tokenizer()
    once = tok.apply_chat_template([{"role": "user", "content": "it was"}], tokenize=False, add_generation_prompt=True)
    assert has_chat_template(tok, once) and not has_chat_template(tok, "the movie was")
    assert not has_chat_template(tok, "so movie")  # plain words that happen to end the template are no marker
    ids = encode_prompts(tok, [once, "it was", [{"role": "user", "content": "it was"}]], 32)
    want = ["<bos>", "it", "was", "<eos>", "<bos>", "movie"]
    assert [tok.convert_ids_to_tokens(i) for i in ids] == [want, want, want]
    # none: text as it is (the tokenizer's own BOS in front), and messages need the template.
    assert tok.convert_ids_to_tokens(encode_prompts(tok, ["it was"], 32, "none")[0]) == ["<bos>", "it", "was"]
    with pytest.raises(ConfigError, match="--chat-template none"):
        encode_prompts(tok, [[{"role": "user", "content": "so"}]], 32, "none")
    with pytest.raises(ConfigError, match="chat_template"):
        validate(quick("/tmp/unused", chat_template="chatml"))

    # ChatML with a default system prompt: a prompt templated with a system prompt of its own is
    # recognised by the special token the template starts with, or by the generation prompt.
    chatml = builtin.build_tokenizer()
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    own = chatml.apply_chat_template([{"role": "system", "content": "be nice"}, {"role": "user", "content": "it was"}],
                                     tokenize=False, add_generation_prompt=True)
    assert has_chat_template(chatml, own) and has_chat_template(chatml, "so it was<|im_end|>\n<|im_start|>assistant\n")
    assert not has_chat_template(chatml, "it was")


def test_stop_token_ends_responses_and_bf16_on_cpu_is_a_notice(tmp_path, capfd):
    stop = builtin.VOCAB.index("the")
    capfd.readouterr()
    cfg = task(tmp_path / "run", max_new_tokens=12, stop_token_id=stop, bf16=True, device="cpu")
    trainer = PPOTrainer(cfg)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "bf16" in ln]
    assert len(lines) == 1 and "--bf16 is ignored on cpu" in lines[0]
    assert trainer.bf16 is False
    ids, attn = left_pad(trainer.prompt_ids, trainer.tokenizer.pad_token_id, trainer.device)
    torch.manual_seed(0)
    resp, mask = trainer.generate(ids, attn)
    by_stop = 0
    for r, m in zip(resp, mask):
        n = int(m.sum())
        ends = ((r[:n] == stop) | (r[:n] == EOS)).nonzero()
        if len(ends):
            assert ends[0].item() == n - 1  # the first stop or EOS is the last response token
            by_stop += int(r[n - 1] == stop)
        else:
            assert n == resp.shape[1] == 12
    assert by_stop > 5  # 240 prompts, ~1/40 chance per token


def test_missing_eos_penalty_hand_worked(tmp_path, monkeypatch):
    stop, pad, w = builtin.VOCAB.index("the"), builtin.VOCAB.index("<pad>"), builtin.VOCAB.index("good")
    cfg = task(tmp_path / "run", stop_token_id=stop, missing_eos_penalty=0.5, reward=None)
    trainer = PPOTrainer(cfg, lambda prompts, completions: [1.0] * len(completions))
    responses = torch.tensor([[w, EOS, pad], [w, w, w], [stop, pad, pad], [w, w, EOS]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([1.0, 2.0, -1.0, 0.25])
    # rows 0, 2, 3 end with EOS or the stop token; row 1 was cut off at max_new_tokens
    torch.testing.assert_close(trainer.penalize_missing_eos(scores, responses, mask),
                               torch.tensor([1.0, 1.5, -1.0, 0.25]))
    no_penalty = PPOTrainer(cfg.replace(output_dir=str(tmp_path / "b"), missing_eos_penalty=None), lambda p, c: [0.0] * len(c))
    assert no_penalty.penalize_missing_eos(scores, responses, mask) is scores

    # Through an iteration: the reward function says 1 for all, two of four rows lack an end.
    monkeypatch.setattr(trainer, "generate", lambda ids, attn: (responses.clone(), mask.clone()))
    assert trainer.iteration()["score_mean"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_yaml_numbers_take_the_type_of_their_option(tmp_path):
    from fastppo.cli import build_parser
    from fastppo.train.cli import resolve_config

    f = tmp_path / "run.yaml"
    f.write_text("learning_rate: 5e-6\ncritic_learning_rate: 5e-6\nmissing_eos_penalty: 1e0\n"
                 "iterations: 1e3\nstop_token_id: 2\nkl_coef: '0.1'\n")  # YAML 1.1: 5e-6, 1e0, 1e3 are text
    cfg = PPOConfig.from_file(f)
    assert cfg.learning_rate == 5e-6 and isinstance(cfg.learning_rate, float)
    assert cfg.critic_learning_rate == 5e-6 and cfg.missing_eos_penalty == 1.0 and cfg.kl_coef == 0.1
    assert cfg.iterations == 1000 and type(cfg.iterations) is int and cfg.stop_token_id == 2
    cfg.check()
    cli = resolve_config(build_parser().parse_args(["train", "--config", str(f), "--learning-rate", "1e-4"]))
    assert cli.learning_rate == 1e-4 and cli.critic_learning_rate == 5e-6 and cli.iterations == 1000
    f.write_text("iterations: 1.5e1\n")  # 15.0: a whole number, still an integer
    assert PPOConfig.from_file(f).iterations == 15
    f.write_text("iterations: 2.5e0\n")  # not a whole number: refused, not rounded
    with pytest.raises(ConfigError, match="iterations"):
        PPOConfig.from_file(f).check()
