"""What --gradient-checkpointing saves: bytes autograd keeps for the backward pass of one actor
update (forward through fastppo's fused log-prob head, then backward), with and without it.

    python examples/memory_switches.py

A randomly initialised Llama (hidden 256, MLP 688, 8 layers, vocabulary 1000), 4 sequences of 512
tokens with 256 response tokens, one CPU thread. The gradients are the same either way (printed).
"""

import time
import warnings

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import fastppo
from fastppo.train.models import enable_gradient_checkpointing, position_ids_from, response_logprobs

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
for checkpointing in (False, True):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    if checkpointing:
        enable_gradient_checkpointing(model)
    seq = torch.randint(0, config.vocab_size, (4, 512))
    attn = torch.ones_like(seq)
    mask = torch.ones(4, 256, dtype=torch.bool)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with fastppo.use_backend("torch"):
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logprobs, _ = response_logprobs(model, seq, attn, position_ids_from(attn), 256, mask, 1.0, True)
        logprobs.sum().backward()
        seconds = time.perf_counter() - t0
    grad = sum(p.grad.double().abs().sum() for p in model.parameters()).item()
    print(f"gradient_checkpointing={checkpointing}: {saved[0] / 2**20:.1f} MiB kept for backward, "
          f"forward + backward {seconds:.2f} s, sum of |grad| {grad:.6f}")
