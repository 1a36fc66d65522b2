"""The package's shape: what `import lafs_fast` does and does not do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *, site: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from outside the checkout; ``site=False``: no installed
    lafs_fast (no editable finder), only PYTHONPATH=the checkout, as on the offline GPU machine."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", code] if site else [sys.executable, "-S", "-c",
                                                     f"import sys; sys.path.extend({[p for p in sys.path if p.endswith('site-packages')]!r}); {code}"]
    return subprocess.run(argv, capture_output=True, text=True, cwd="/", env=env, timeout=120)


def test_only_kernels_is_mapped_into_the_package():
    """The root of the checkout was on lafs_fast.__path__: every top-level folder became a subpackage
    (lafs_fast.tests, a second copy of everything as lafs_fast.lafs_fast.*)."""
    code = ("import importlib, lafs_fast, lafs_fast.kernels as k; print(k.__file__); "
            "bad = [n for n in ('lafs_fast.tests', 'lafs_fast.lafs_fast', 'lafs_fast.benchmarks') "
            "if importlib.util.find_spec(n) is not None]; print('bad', bad)")
    for site in (True, False):
        r = _python(code, site=site)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.splitlines()[0] == str(ROOT / "kernels" / "__init__.py") and r.stdout.splitlines()[1] == "bad []", r.stdout


def test_import_lafs_fast_stays_light():
    """No torchvision (nor its CPU op fix) until a module that needs it is imported."""
    r = _python("import sys, lafs_fast; print('torchvision' in sys.modules, 'timm' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False False", r.stdout + r.stderr[-2000:]
