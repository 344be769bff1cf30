"""``PPOConfig``: every knob of a ``fastppo train`` run, from defaults, a YAML/TOML file and flags.

Precedence is defaults < file < command-line flags, so a file can pin an experiment and a flag
can still change one value of it without editing the file.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model is loaded or step is taken."""


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
    output_dir: str = "runs/fastppo"
    resume: bool = False
    """Continue from the newest checkpoint in ``output_dir/checkpoints``."""

    # --- LoRA -----------------------------------------------------------------------------
    lora_r: int = 0
    """LoRA rank; 0 trains the whole actor (and keeps a frozen copy as the reference)."""
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    """Comma-separated module names, or ``all-linear``."""

    # --- rollout --------------------------------------------------------------------------
    iterations: int = 60
    batch_size: int = 64
    """Prompts per iteration (one response each)."""
    max_prompt_length: int = 128
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0

    # --- optimisation ---------------------------------------------------------------------
    ppo_epochs: int = 2
    mini_batch_size: int = 32
    """Sequences per optimizer step."""
    micro_batch_size: int = 32
    """Sequences per forward/backward; mini_batch_size / micro_batch_size accumulation steps."""
    learning_rate: float = 1e-5
    critic_learning_rate: float | None = None
    """Default: ``learning_rate``."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    """``constant`` or ``linear`` (decay to 0 at the last optimizer step), after warm-up."""
    max_grad_norm: float = 1.0

    # --- PPO math (arguments of fastppo.compute_advantages / fastppo.ppo_loss) -------------
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
    kl_estimator: str = "k1"
    kl_coef: float = 0.05
    kl_target: float | None = None
    """Set to use the adaptive KL controller (Ziegler et al. 2019) aiming at this KL per sequence."""
    kl_horizon: int = 10000
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

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values a custom reward function may read; ignored by the trainer."""

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> "PPOConfig":
        """Load a ``.yaml``/``.yml`` or ``.toml`` file; ``overrides`` (not None) win over it."""
        data = load_file(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PPOConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config option(s) {unknown}; known options: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "PPOConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``ConfigError`` for values that cannot work; needs no file or model."""
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

        for name in ("iterations", "batch_size", "max_new_tokens", "ppo_epochs", "mini_batch_size",
                     "micro_batch_size", "learning_rate", "temperature", "max_prompt_length"):
            positive(name)
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError(f"kl_target must be > 0 or unset, got {self.kl_target}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0, got {self.save_every}")
        if self.reward_model is not None and self.reward is not None:
            raise ConfigError("give either reward_model or reward (a built-in reward name), not both")


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The option mapping of a ``.yaml``/``.yml`` or ``.toml`` file (dashes in names become underscores)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yaml", ".yml"):
        import yaml

        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    elif ext == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        with open(path, "rb") as f:
            data = tomllib.load(f)
    else:
        raise ConfigError(f"config file {path!r}: expected a .yaml, .yml or .toml file, got {ext or 'no extension'!r}")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping of option names to values, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


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
