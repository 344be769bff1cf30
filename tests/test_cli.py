"""`fastppo verify` and `fastppo bench` run, print their tables and write JSON."""

from __future__ import annotations

import json

from fastppo.cli import main


def test_verify_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "verify.json"
    assert main(["verify", "--ops", "gae,policy_loss", "--seed", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max abs" in text and "PASS" in text and "FAIL" not in text
    data = json.loads(out.read_text())
    ops = {row["op"] for row in data["rows"]}
    assert ops == {"gae", "policy_loss"}
    assert all(row["passed"] for row in data["rows"])
    assert {"fwd", "bwd"} <= {row["direction"] for row in data["rows"]}  # policy_loss has a backward
    assert data["seed"] == 3 and data["triton"]


def test_verify_fails_when_a_kernel_is_wrong(monkeypatch, tmp_path, capsys):
    # A kernel that is off by a little must turn the run red: the command is only worth its exit code.
    import fastppo.kernels.advantage as adv

    real = adv.kl_penalty

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs) + 1e-3

    monkeypatch.setattr(adv, "kl_penalty", off_by_a_bit)
    assert main(["verify", "--ops", "kl_penalty", "--seed", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_rejects_an_unknown_op(capsys):
    assert main(["verify", "--ops", "nope"]) == 2
    assert "unknown op(s) nope" in capsys.readouterr().err


def test_bench_times_the_references_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--ops", "gae", "--reps", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kernel timings need a GPU" in text
    data = json.loads(out.read_text())
    torch_rows = [r for r in data["results"] if r["impl"] == "torch"]
    assert torch_rows and torch_rows[0]["median_ms"] > 0 and torch_rows[0]["pct_roofline"] > 0
    assert data["copy_bandwidth_gbps"] > 0 and data["commit"]
