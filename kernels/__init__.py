"""Triton kernels of fastppo, installed as ``fastppo.kernels``.

One kernel family per file. Each file is laid out top to bottom as: the ``@triton.jit``
kernels, the Python launchers that check inputs and pick block sizes, and the
``torch.autograd.Function`` that ties forward and backward together.

``KERNEL_OPS`` maps a public op name to ``"module:function"`` inside this package. The
dispatcher (``fastppo._dispatch``) reads it without importing triton; a kernel module is only
imported the first time its op runs on the Triton backend, so that ``TRITON_INTERPRET`` can
still be set after ``import fastppo``. A kernel function takes exactly the op's public
arguments, already validated.
"""

if __name__ == "kernels":  # pragma: no cover - exercised in subprocesses by tests/test_packaging.py
    # Imported as a top-level module: the checkout's root is on sys.path (``python -m`` or
    # ``python -c`` run there, or PYTHONPATH), and this folder is standing in for Hugging Face's
    # ``kernels`` package, which transformers imports when it loads a model. Step aside: drop the
    # root from sys.path and hand the importer the real package (or its ImportError).
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    except ModuleNotFoundError as _err:
        if _err.name != "kernels":
            raise
        # The package is not installed. transformers before 5.25 probes for it by importing
        # whatever find_spec found and does not catch the ImportError (vLLM's model-inspection
        # subprocess, started in the checkout, died of it). A file-less stand-in reads as
        # "not installed" to that probe and to find_spec.
        import importlib.machinery
        import types

        _absent = types.ModuleType("kernels")
        _absent.__spec__ = importlib.machinery.ModuleSpec("kernels", None)
        sys.modules["kernels"] = _absent

KERNEL_OPS: dict[str, str] = {
    "kl_penalty": "advantage:kl_penalty",
    "shape_rewards": "advantage:shape_rewards",
    "gae": "advantage:gae",
    "masked_whiten": "advantage:masked_whiten",
    "compute_advantages": "advantage:compute_advantages",
    "policy_loss": "ppo_loss:policy_loss",
    "value_loss": "ppo_loss:value_loss",
    "ppo_loss": "ppo_loss:ppo_loss",
    "aggregate": "ppo_loss:aggregate",
    "logprobs_from_logits": "logprob:logprobs_from_logits",
    "entropy_from_logits": "logprob:entropy_from_logits",
    "linear_logprobs": "linear_logprob:linear_logprobs",
    "linear_ppo_loss": "linear_logprob:linear_ppo_loss",
    "group_advantages": "group_advantage:group_advantages",
    "reinforce_pp_advantages": "group_advantage:reinforce_pp_advantages",
    "dppo_tv_loss": "policy_objectives:dppo_tv_loss",
    "dppo_kl_loss": "policy_objectives:dppo_kl_loss",
    "sapo_loss": "policy_objectives:sapo_loss",
    "gpg_loss": "policy_objectives:gpg_loss",
    "cispo_loss": "policy_objectives:cispo_loss",
    "dro_loss": "policy_objectives:dro_loss",
    "gspo_loss": "seq_policy_loss:gspo_loss",
    "geo_mean_loss": "seq_policy_loss:geo_mean_loss",
}
