"""What may import what: the method library runs without Ray, the results schema and the leaderboard without torch or Ray."""

import subprocess
import sys


def test_indivaid_never_imports_ray_optuna_or_harness():
    code = (
        "import importlib, pkgutil, sys, indivaid\n"
        "for m in pkgutil.walk_packages(indivaid.__path__, 'indivaid.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "import indivaid.__main__\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'optuna', 'harness'))\n"
        "print(len([n for n in sys.modules if n.startswith('indivaid')]), bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    n_modules = int(out.stdout.split()[0])
    assert n_modules >= 15  # the walk really imported the package tree


def test_results_schema_and_leaderboard_never_import_torch_or_ray():
    """The results schema and the leaderboard run on a laptop with results copied from a cluster:
    importing them (every leaderboard submodule included) must not pull in torch, Ray or Optuna."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import harness.results, harness.leaderboard\n"
        "names = ['harness.results', 'harness.leaderboard']\n"
        "names += [m.name for m in pkgutil.walk_packages(harness.leaderboard.__path__, 'harness.leaderboard.')\n"
        "          if not m.name.endswith('__main__')]\n"
        "for n in names: importlib.import_module(n)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'ray', 'optuna'))\n"
        "print(len(names), bad[:10])\n"
        "assert not bad, bad[:10]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert int(out.stdout.split()[0]) >= 8  # results + the leaderboard package and its submodules
