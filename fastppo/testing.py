"""Shared by the tests and ``fastppo verify``: tolerances per dtype, comparison, random masks."""

from __future__ import annotations

import torch

# (atol, rtol) of a kernel fed with inputs of this dtype, against the float64 reference of the
# same (already rounded) inputs. Kernels accumulate in float32 whatever the input dtype, so the
# error is float32 rounding grown by the reduction; bf16/fp16 inputs add the rounding of any
# output stored in the input dtype (the gradient of the logits).
# float32 gradients get 1e-4: the entropy gradient -p (log p + H) / T is a difference of terms of
# the size of the scaled logits (|z| ~ 20 at temperature 0.7), so any float32 implementation,
# PyTorch's autograd included, loses a few 1e-5 to cancellation there.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
# Outputs kept in float32 (log-probs, losses, advantages) are not rounded to the input dtype.
TOL_FP32_OUT = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
}


def _same_special(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Where actual and expected are the same infinity, or both NaN (the contract: NaN in at a
    valid position, NaN out). These count as exact; a NaN against a number never does."""
    same_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    return same_inf | (torch.isnan(a) & torch.isnan(e))


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max rel error) with equal infinities and NaN against NaN counted as exact;
    any other NaN counts as inf."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return 0.0, 0.0
    err = torch.where(_same_special(a, e), 0.0, (a - e).abs())
    err = torch.where(torch.isnan(err), float("inf"), err)
    rel = err / torch.where(torch.isinf(e), 1.0, e.abs()).clamp(min=1e-30)
    return err.max().item(), rel.max().item()


def within(actual: torch.Tensor, expected: torch.Tensor, tol) -> torch.Tensor:
    """Elementwise |a - e| <= atol + rtol * |e|; NaN passes only where NaN is expected (and a
    poisoned, unwritten output is NaN where a number is expected, so it fails); -inf matches only
    -inf."""
    atol, rtol = tol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    special = _same_special(a, e)
    err = torch.where(special, 0.0, (a - e).abs())
    bound = atol + rtol * torch.where(torch.isinf(e) | torch.isnan(e), 0.0, e.abs())
    return special | ((err <= bound) & ~torch.isnan(a))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol, what: str = "") -> None:
    """Assert :func:`within` everywhere, naming the first element that is off."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    ok = within(actual, expected, tol)
    if not bool(ok.all()):
        a = actual.detach().to("cpu", torch.float64)
        e = expected.detach().to("cpu", torch.float64)
        bad = ~ok
        idx = tuple(bad.nonzero()[0].tolist())
        abs_err, _ = errors(a, e)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off (max abs error {abs_err:.3e}); "
            f"first at {list(idx)}: got {a[idx].item()!r}, expected {e[idx].item()!r} "
            f"(atol={tol[0]}, rtol={tol[1]})"
        )


def random_mask(B: int, T: int, gen: torch.Generator, *, kinds=None) -> torch.Tensor:
    """A ``[B, T]`` bool mask whose rows cycle through the layouts the contract names.

    Row kinds: right padding, left padding, a gap in the middle, an empty row, a full row,
    a single valid token, and a random scatter. With B >= 4 every batch has an empty row.
    """
    kinds = kinds or ("right", "left", "gap", "empty", "full", "single", "scatter")
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        kind = kinds[b % len(kinds)]
        n = int(torch.randint(1, T + 1, (1,), generator=gen)) if T > 0 else 0
        if kind == "right":
            mask[b, :n] = True
        elif kind == "left":
            mask[b, T - n :] = True
        elif kind == "gap":
            mask[b] = True
            if T >= 3:
                lo = int(torch.randint(1, T - 1, (1,), generator=gen))
                hi = int(torch.randint(lo + 1, T, (1,), generator=gen))
                mask[b, lo:hi] = False
        elif kind == "full":
            mask[b] = True
        elif kind == "single" and T > 0:
            mask[b, int(torch.randint(0, T, (1,), generator=gen))] = True
        elif kind == "scatter":
            mask[b] = torch.rand(T, generator=gen) < 0.6
        # "empty": leave the row all False
    return mask


def triton_version() -> str:
    """Triton's version, for the provenance of verify and bench results."""
    try:
        import triton

        return triton.__version__
    except Exception:  # pragma: no cover - triton is a dependency
        return "not installed"


def select_ops(cases: list, ops: str | None) -> list:
    """The cases whose ``.op`` is named in the comma-separated ``ops`` (all when None)."""
    if not ops:
        return cases
    wanted = set(ops.split(","))
    unknown = wanted - {c.op for c in cases}
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(sorted(unknown))}")
    return [c for c in cases if c.op in wanted]
