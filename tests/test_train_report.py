"""--report-to (TensorBoard, wandb), the matplotlib plot and `fastppo plot`, and Ctrl-C/SIGTERM that saves."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types

import pytest

pytest.importorskip("transformers")

from fastppo.cli import main  # noqa: E402
from fastppo.train import PPOTrainer, builtin, checkpoint, report  # noqa: E402
from fastppo.train.metrics import PLOTTED, plot_runs  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("torch_backend")]

TINY = ["--iterations", "2", "--batch-size", "8", "--mini-batch-size", "8", "--micro-batch-size", "8",
        "--max-new-tokens", "4", "--ppo-epochs", "1", "--no-progress"]



def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _err_line(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------
# --report-to

def test_report_to_tensorboard_logs_every_metrics_field(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = builtin.default_config(output_dir=str(tmp_path), iterations=2, batch_size=8, mini_batch_size=8,
                                 micro_batch_size=8, max_new_tokens=4, ppo_epochs=1, progress=False, plot=False,
                                 report_to="tensorboard")
    PPOTrainer(cfg).train()
    rows = _rows(tmp_path)
    acc = EventAccumulator(report.tensorboard_dir(str(tmp_path)), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(rows[0]) - {"step"}
    for key in tags:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2], key
        for e, row in zip(events, rows):
            if row[key] is not None:
                assert e.value == pytest.approx(row[key], rel=1e-6, abs=1e-6), key


def test_report_to_rejects_unknown_and_missing_packages(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--report-to", "mlflow"]) == 2
    assert "report_to (--report-to) must be one of none, tensorboard, wandb" in _err_line(capsys)

    real = report.importlib.util.find_spec
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", "--output-dir", str(out), "--report-to", "wandb"]) == 2
    line = _err_line(capsys)
    assert "needs the wandb package" in line and "pip install 'fastppo[wandb]'" in line
    assert not out.exists()  # failed before the built-in model was written or loaded


def test_wandb_goes_offline_without_network(tmp_path, monkeypatch):
    logged, init = [], {}

    class Run:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            logged.append("finished")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: (init.update(kw, mode=os.environ.get("WANDB_MODE")), Run())[1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(report, "_wandb_reachable", lambda timeout=2.0: False)
    cfg = builtin.default_config(output_dir=str(tmp_path), report_to="wandb")
    rep = report.open_reporter(cfg, first_step=1)
    rep.log({"step": 1, "score_mean": 0.5, "kl": float("nan"), "lr": 1e-5})
    rep.close()
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path) and init["config"]["report_to"] == "wandb"
    assert logged == [(1, {"score_mean": 0.5, "lr": 1e-5}), "finished"]


# --------------------------------------------------------------------------------------------
# plots

def _fake_run(path, n=12, shift=0.0):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(1, n + 1):
            row = {"step": step, "score_std": 0.1, **{k: step / n + shift for k in PLOTTED}}
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_plot_command_overlays_runs(tmp_path, capsys):
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", n=8, shift=0.3)
    out = tmp_path / "both.png"
    assert main(["plot", a, b, "-o", str(out)]) == 0
    assert f"plot: {out} (2 runs)" in capsys.readouterr().out
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 20000  # 12 titled, labelled panels, not an empty canvas
    assert main(["plot", a]) == 0  # one run, no -o: redraws its metrics.png
    assert os.path.getsize(os.path.join(a, "metrics.png")) > 20000


def test_plot_panels_have_titles_units_and_score_kl_first(tmp_path, monkeypatch):
    import matplotlib.figure

    seen = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: seen.setdefault("fig", fig))
    plot_runs([("runs/a", [{"step": 1, "score_mean": 0.1, "kl": 0.2}])], str(tmp_path / "x.png"))
    axes = [ax for ax in seen["fig"].axes if ax.get_visible()]
    assert len(axes) == len(PLOTTED)
    assert axes[0].get_title().startswith("Score") and axes[1].get_title().startswith("KL")
    assert all(ax.get_title() and ax.get_xlabel() == "iteration" and ax.get_ylabel() for ax in axes)
    assert "nats" in axes[1].get_ylabel()
    assert [t.get_text() for t in seen["fig"].legends[0].get_texts()] == ["runs/a"]


@pytest.mark.parametrize("case", ["missing", "not-a-dir", "no-metrics", "empty-metrics", "no-out-dir",
                                  "out-is-dir", "out-ext"])
def test_plot_command_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    run = _fake_run(tmp_path / "run")
    args = {"missing": [str(tmp_path / "nope")],
            "not-a-dir": [os.path.join(run, "metrics.jsonl")],
            "no-metrics": [str(tmp_path)],
            "empty-metrics": [run],
            "no-out-dir": [run, "-o", str(tmp_path / "nope" / "x.png")],
            "out-is-dir": [run, "-o", str(tmp_path)],
            "out-ext": [run, "-o", str(tmp_path / "x.txt")]}[case]
    if case == "empty-metrics":
        open(os.path.join(run, "metrics.jsonl"), "w").close()
    try:
        rc = main(["plot", *args])
    except SystemExit as exc:  # -o is checked by argparse, as the other commands' output files
        rc = exc.code
    assert rc == 2
    assert "error:" in _err_line(capsys)


# --------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM

def test_sigterm_saves_and_resume_completes(tmp_path, capsys, monkeypatch):
    sentiment = builtin.REWARDS["sentiment"]

    def once(config):
        fn = sentiment(config)
        calls = []

        def reward(prompts, completions):
            calls.append(1)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of iteration 1
            return fn(prompts, completions)
        return reward

    monkeypatch.setitem(builtin.REWARDS, "sentiment", once)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["train", "--output-dir", str(tmp_path), *TINY, "--iterations", "3", "--no-plot"]
    assert main(argv) == 143
    assert signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after iteration 1 of 3" in err
    assert f" {shlex.join(argv)} --resume\n" in err  # the program part depends on how pytest was started
    assert [os.path.basename(p) for p in checkpoint.checkpoints(str(tmp_path))] == ["step-00000001"]
    assert [r["step"] for r in _rows(tmp_path)] == [1]

    monkeypatch.setitem(builtin.REWARDS, "sentiment", sentiment)
    assert main(argv + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]


def test_ctrl_c_in_a_real_process_saves_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fastppo", "train", "--output-dir", str(out), "--iterations", "8",
            "--batch-size", "32", "--mini-batch-size", "32", "--micro-batch-size", "32", "--max-new-tokens", "16",
            "--no-progress", "--no-plot"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    stopped = len(_rows(out))
    assert 1 <= stopped < 8
    saved = checkpoint.checkpoints(str(out))
    assert [os.path.basename(p) for p in saved] == [f"step-{stopped:08d}"]
    assert "Traceback" not in stderr
    resume = [ln.split("resume with: ", 1)[1] for ln in stderr.splitlines() if "resume with: " in ln]
    assert resume == [f"{shlex.quote(sys.executable)} -m fastppo {shlex.join(argv[3:])} --resume"], stderr

    done = subprocess.run(shlex.split(resume[0]), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {saved[0]} at iteration {stopped}" in done.stdout
    assert [r["step"] for r in _rows(out)] == list(range(1, 9))
