"""The pure modules never import Ray: the simulator, the algorithms and the worker run without it.

Each module is imported in its own fresh interpreter (a module imported earlier in the test
session would hide the leak); the subprocesses run a few at a time in a module fixture.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

PURE_MODULES = [
    "relay_ray.topology",
    "relay_ray.algorithms",
    "relay_ray.data",
    "relay_ray.models",
    "relay_ray.optim",
    "relay_ray.metrics",
    "relay_ray.simulate",
    "relay_ray.quadratics",
    "relay_ray.problems",
    "relay_ray.experiment",
    "relay_ray.worker",
    "relay_ray.config",
    "relay_ray.checkpoint",
    "relay_ray.group",
    "relay_ray.sweep_file",
    "relay_ray.runner",
    "relay_ray.engine.placement",
    "relay_ray.cli",
]


def _import_in_fresh_interpreter(module: str) -> subprocess.CompletedProcess:
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print('LEAKED' if leaked else 'CLEAN', *leaked[:5])\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def imports() -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(PURE_MODULES, pool.map(_import_in_fresh_interpreter, PURE_MODULES)))


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_does_not_import_ray(module, imports):
    result = imports[module]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "CLEAN", f"{module} imports ray: {result.stdout.strip()}"


def test_the_check_detects_ray():
    """The probe itself can fail: importing ray in the child is reported."""
    pytest.importorskip("ray")
    result = _import_in_fresh_interpreter("ray")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("LEAKED")


def _modules_after(code: str, prefixes: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``code`` in a fresh interpreter; the modules it left imported whose name starts with a prefix
    (printed to stderr, so the code's own stdout stays readable)."""
    probe = (code + "\nimport sys\n"
             f"print(*sorted(m for m in sys.modules if m.startswith({prefixes!r})), sep='\\n', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result, [line for line in result.stderr.splitlines() if line.startswith(prefixes)]


def test_help_does_not_import_torch_or_ray():
    """`relay-ray --help`, `run --help` and `compare --help` answer without importing torch or Ray (seconds saved)."""
    result, heavy = _modules_after(
        "from relay_ray import cli\n"
        "for argv in (['--help'], ['run', '--help'], ['compare', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n", ("torch", "ray"))
    assert "--workers-per-actor" in result.stdout  # the help was really printed
    assert heavy == [], heavy[:5]


def test_simulator_never_imports_the_engine_or_the_group():
    """The oracle stays independent of what it checks: `--backend local` runs without the group or the engine."""
    _, used = _modules_after(
        "from relay_ray.config import RunConfig\n"
        "from relay_ray.simulate import simulate\n"
        "simulate(RunConfig(dataset='quadratics', num_workers=4, steps=3, eval_every=3, backend='local'), "
        "progress=False)\n", ("relay_ray.group", "relay_ray.runner", "relay_ray.engine", "ray"))
    assert used == [], used[:5]


def test_the_module_probe_sees_an_import():
    """The probe can fail: a module the code imports is reported."""
    _, used = _modules_after("import relay_ray.group\n", ("relay_ray.group",))
    assert used == ["relay_ray.group"]
