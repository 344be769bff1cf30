"""fastppo: PPO for language models, with a Triton kernel for every hot path.

The ops below dispatch between the Triton kernels (``fastppo.kernels``) and the plain PyTorch
references (``fastppo.reference``) by ``FASTPPO_BACKEND``; see ``fastppo._dispatch``.
Importing fastppo does not import triton.
"""

from . import reference
from ._dispatch import current_backend, use_backend
from .estimators import ADVANTAGE_ESTIMATORS, get_advantage_estimator
from .objectives import POLICY_LOSSES, get_policy_loss, register_policy_loss
from .policy_objectives import cispo_loss, dppo_kl_loss, dppo_tv_loss, dro_loss, gpg_loss, sapo_loss
from .ops import (
    aggregate,
    compute_advantages,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_penalty,
    linear_logprobs,
    linear_ppo_loss,
    logprobs_from_logits,
    masked_whiten,
    policy_loss,
    ppo_loss,
    reinforce_pp_advantages,
    shape_rewards,
    value_loss,
)
from .rollout_correction import bypass_mode_loss, rollout_correction
from .seq_objectives import clip_cov_loss, geo_mean_loss, gspo_loss, kl_cov_loss

__version__ = "0.1.0"

# The PPO engine pulls in transformers; load it only when asked for, so that the ops stay cheap
# to import.
_ENGINE = ("PPOConfig", "PPOTrainer", "ConfigError")


def __getattr__(name):
    if name in _ENGINE:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module 'fastppo' has no attribute {name!r}")

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ConfigError",
    "POLICY_LOSSES",
    "PPOConfig",
    "PPOTrainer",
    "aggregate",
    "cispo_loss",
    "bypass_mode_loss",
    "clip_cov_loss",
    "compute_advantages",
    "current_backend",
    "dppo_kl_loss",
    "dppo_tv_loss",
    "dro_loss",
    "entropy_from_logits",
    "gae",
    "get_advantage_estimator",
    "geo_mean_loss",
    "get_policy_loss",
    "gpg_loss",
    "group_advantages",
    "gspo_loss",
    "kl_cov_loss",
    "kl_penalty",
    "linear_logprobs",
    "linear_ppo_loss",
    "logprobs_from_logits",
    "masked_whiten",
    "policy_loss",
    "ppo_loss",
    "reference",
    "register_policy_loss",
    "reinforce_pp_advantages",
    "sapo_loss",
    "rollout_correction",
    "shape_rewards",
    "use_backend",
    "value_loss",
]
