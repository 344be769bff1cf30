"""verl 0.9.1's own tests, run with fastppo swapped into verl.

verl's wheel has no tests; ``make setup`` unpacks the sdist's ``tests/`` into
``.venv/peer-tests/verl/tests`` (``FASTPPO_VERL_TESTS`` points elsewhere). Each file of ``PARTS``
is copied into one fresh directory next to a ``conftest.py`` that calls
``fastppo.integrations.verl.install(...)`` with every part the adapter offers (every boolean keyword
of ``install``, so parts added later are in automatically) and again before each test, and all of
them run in one pytest subprocess (installing patches verl module-wide; the subprocess keeps that
away from the rest of the suite). Per file, the test asserts that verl's tests pass, and that
fastppo really was installed when each of them started.

To add verl test files, extend ``PARTS``: (path under verl's ``tests/``, pytest ``-k``
expression or None, why it is there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERL_TESTS = Path(os.environ.get("FASTPPO_VERL_TESTS", ROOT / ".venv" / "peer-tests" / "verl" / "tests"))

PARTS = [
    ("trainer/ppo/test_rollout_corr.py", None, "rollout_corr_helper: IS weights, rejection, metrics"),
    ("trainer/ppo/test_rollout_corr_integration.py", None, "rollout correction with the vanilla loss"),
    ("trainer/ppo/test_core_algos_on_cpu.py", None, "policy losses, estimators, GAE, KL, agg_loss"),
    ("trainer/ppo/test_dynamic_policy_losses_on_cpu.py", None, "the policy-loss registry"),
    ("trainer/ppo/test_loss_aggregation_on_cpu.py", None, "agg_loss under global-batch normalisation"),
    ("trainer/ppo/test_value_loss_normalization_on_cpu.py", None, "value loss normalisation"),
    ("trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py", None, "REINFORCE++ on multi-turn masks"),
]

CONFTEST = '''
import inspect

import fastppo.integrations.verl as fv

_params = inspect.signature(fv.install).parameters
EVERYTHING = {name: True for name, p in _params.items() if p.kind is p.KEYWORD_ONLY and isinstance(p.default, bool)}
fv.install(**EVERYTHING)


def pytest_report_header(config):
    return "fastppo installed into verl: " + ", ".join(sorted(EVERYTHING))


def pytest_runtest_setup(item):
    # Some verl tests rebuild verl's registries (and restore them afterwards): every test starts
    # with fastppo installed again, and the outer test checks that the installation held.
    fv.install(**EVERYTHING)
    missing = sorted(k for k, v in fv.installed().items() if k in EVERYTHING and not v)
    if missing:
        with open("fastppo_not_installed.txt", "a") as f:
            f.write(f"{item.nodeid}: {', '.join(missing)}\\n")
'''


@pytest.fixture(scope="module")
def verl_run(tmp_path_factory):
    """Every file of PARTS in one pytest subprocess (verl and torch are imported once):
    ``(workdir, {file name: [(test id, outcome, message)]}, output tail)``."""
    pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (make setup installs it)")
    if not VERL_TESTS.is_dir():
        pytest.skip(f"verl's sdist tests are not at {VERL_TESTS}: `make setup` downloads them "
                    "(pip download verl==0.9.1 --no-deps --no-binary :all:), or set FASTPPO_VERL_TESTS")
    work = tmp_path_factory.mktemp("verl_own_tests")
    files = []
    for path, _, _ in PARTS:
        source = VERL_TESTS / path
        if source.is_file():
            shutil.copy(source, work / source.name)
            files.append(source.name)
    (work / "conftest.py").write_text(CONFTEST)
    selects = [sel for _, sel, _ in PARTS if sel]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml=report.xml", *files]
    if selects:
        cmd += ["-k", " or ".join(f"({s})" for s in selects)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               FASTPPO_VERL_INSTALL="0")
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    tail = (done.stdout + done.stderr)[-4000:]
    if not (work / "report.xml").is_file():
        pytest.fail(f"verl's tests did not run:\n{tail}")
    results: dict[str, list[tuple[str, str, str]]] = {}
    for case in ET.parse(work / "report.xml").iter("testcase"):
        name = case.get("classname", "").split(".")[0] + ".py"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, (node.get("message") or "")[:500]
        results.setdefault(name, []).append((f"{case.get('classname')}::{case.get('name')}", outcome, message))
    return work, results, tail


@pytest.mark.parametrize("path, select, why", PARTS, ids=[p[0].rsplit("/", 1)[-1] for p in PARTS])
def test_verl_own_test_file_passes_with_fastppo_installed(verl_run, path, select, why):
    work, results, tail = verl_run
    name = path.rsplit("/", 1)[-1]
    if not (VERL_TESTS / path).is_file():
        pytest.skip(f"{path} is not in this verl sdist")
    cases = results.get(name, [])
    assert cases, f"verl's {path} ({why}) ran no test:\n{tail}"
    bad = [c for c in cases if c[1] in ("failure", "error")]
    assert not bad, f"verl's {path} ({why}) failed with fastppo installed: " + "; ".join(
        f"{t}: {m}" for t, _, m in bad)
    missing = work / "fastppo_not_installed.txt"
    lines = [ln for ln in (missing.read_text().splitlines() if missing.is_file() else []) if ln.startswith(name)]
    assert not lines, "fastppo was not (fully) installed for: " + "; ".join(lines)
