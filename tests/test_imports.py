"""The method library must run without Ray: importing all of it must not import the harness stack."""

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
