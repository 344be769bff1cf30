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


def test_bench_refuses_an_output_no_file_can_be_created_in_before_running(capsys):
    import os

    import pytest

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc, where no file can be created whatever the permission bits say")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--ops", "gae", "--reps", "1", "--json", "/proc/fastppo-bench.json"])
    err = capsys.readouterr()
    assert exc.value.code == 2 and "cannot create files in '/proc'" in err.err
    assert len(err.err.strip().splitlines()) == 1 and "Traceback" not in err.err
    assert "measured copy bandwidth" not in err.out  # refused before any timing ran


def test_the_package_has_no_import_circle():
    # Every import, also one inside a function: a circle makes the import order matter and hides
    # which module owns a shared piece.
    import ast
    import os

    root = os.path.join(os.path.dirname(__file__), os.pardir, "fastppo")
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = "fastppo." + os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                files[dotted.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                target = node.module if not node.level else (f"{base}.{node.module}" if node.module else base)
                targets = [f"{target}.{a.name}" for a in node.names] + [target]
            for t in targets:
                while t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod and not files[t].endswith("__init__.py"):
                    deps.add(t)
        graph[mod] = deps

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    circles = sorted(m for m in graph if m in reachable(m))
    assert circles == []
