"""Comparison helpers for the tests (they live in fastppo.testing so `fastppo verify` shares them)."""

from fastppo.testing import TOL, TOL_FP32_OUT, assert_close, errors, random_mask, within  # noqa: F401


def small_config(out, *, mini_batch_size=8, **kw):
    """The built-in task at its smallest for trainer tests: 2 iterations of 8 responses of at most
    4 tokens, one PPO epoch, a checkpoint every iteration, no progress bar or plot; mini- and
    micro-batches of ``mini_batch_size`` rows (8: one optimizer step per iteration)."""
    from fastppo.train import builtin

    base = dict(output_dir=str(out), iterations=2, batch_size=8, mini_batch_size=mini_batch_size,
                micro_batch_size=mini_batch_size, max_new_tokens=4, ppo_epochs=1, progress=False, plot=False,
                save_every=1)
    base.update(kw)
    return builtin.default_config(**base)


def pad_responses(rows, pad_id, device):
    """Token-id lists as a sampler returns them: ([N, longest] long right-padded with ``pad_id``,
    [N, longest] bool mask of the real tokens), both on ``device``."""
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return out.to(device), mask.to(device)


def assert_train_refuses(tmp_path, capfd, argv, expected):
    """``fastppo train`` (tiny run) + ``argv`` exits 2 with one stderr line containing ``expected``
    and writes no checkpoint."""
    import os

    from fastppo.cli import main as cli_main

    quick = ["train", "--iterations", "1", "--batch-size", "4", "--mini-batch-size", "4", "--micro-batch-size", "4",
             "--max-new-tokens", "2", "--no-progress", "--no-plot", "--output-dir", str(tmp_path / "out")]
    capfd.readouterr()
    try:
        rc = cli_main(quick + argv)
    except SystemExit as exc:
        rc = exc.code
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def backend_caller(backend, run_kernel):
    """``call(fn, *args, **kwargs)`` running a fastppo op on ``backend``: "triton" through the
    ``run_kernel`` fixture (interpreter, poisoned outputs), "torch" under ``use_backend("torch")``."""
    if backend == "triton":
        return lambda fn, *a, **k: run_kernel(fn, *a, **k)

    def on_torch(fn, *a, **k):
        import fastppo

        with fastppo.use_backend("torch"):
            return fn(*a, **k)

    return on_torch


def torchrun_env(root):
    """The environment of a 2-rank ``torch.distributed.run`` test launch: this checkout first on
    ``PYTHONPATH``, one thread per rank, a 60 s collective timeout, no rank variables inherited."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["FASTPPO_DIST_TIMEOUT"] = "60"
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env
