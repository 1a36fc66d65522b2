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
    argv = (
        [sys.executable, "-c", code]
        if site
        else [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path.extend({[p for p in sys.path if p.endswith('site-packages')]!r}); {code}",
        ]
    )
    return subprocess.run(argv, capture_output=True, text=True, cwd="/", env=env, timeout=120)


def test_only_kernels_is_mapped_into_the_package():
    """The root of the checkout was on lafs_fast.__path__: every top-level folder became a subpackage
    (lafs_fast.tests, a second copy of everything as lafs_fast.lafs_fast.*)."""
    code = (
        "import importlib, lafs_fast, lafs_fast.kernels as k; print(k.__file__); "
        "bad = [n for n in ('lafs_fast.tests', 'lafs_fast.lafs_fast', 'lafs_fast.benchmarks') "
        "if importlib.util.find_spec(n) is not None]; print('bad', bad)"
    )
    for site in (True, False):
        r = _python(code, site=site)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (
            r.stdout.splitlines()[0] == str(ROOT / "kernels" / "__init__.py") and r.stdout.splitlines()[1] == "bad []"
        ), r.stdout


def test_import_lafs_fast_stays_light():
    """No torchvision (nor its CPU op fix) until a module that needs it is imported."""
    r = _python("import sys, lafs_fast; print('torchvision' in sys.modules, 'timm' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False False", r.stdout + r.stderr[-2000:]


_BLOCKED = (
    "xformers",
    "nvidia",
    "face_alignment",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "matplotlib",
    "skimage",
    "cv2",
    "pytest_benchmark",
    "triton",
    "tensorboard",
    "wandb",
)
_WITHOUT_EXTRAS = f"""
import sys
for name in {_BLOCKED!r}:
    sys.modules[name] = None  # import raises ModuleNotFoundError, importlib.util.find_spec says absent
from lafs_fast.cli import main
"""


def test_a_core_install_runs_help_and_info():
    """`pip install lafs-fast` without extras (a laptop: no triton, xformers, DALI, face-alignment,
    ONNX, matplotlib, scikit-image): the commands' help and `lafs-fast info` still run, each missing
    fast path reported as such."""
    r = _python(
        _WITHOUT_EXTRAS + "rc = [main(['--help']), main(['info']), main(['info', '--json'])]\n"
        "import contextlib, io\n"
        "for cmd in ('pretrain', 'train-landmarks', 'finetune', 'eval', 'embed', 'data', 'checkpoint', 'viz', "
        "'config'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main([cmd, '--help'])\n"
        "        except SystemExit as e:\n"
        "            rc.append(e.code)\n"
        "print('rc', rc)"
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "rc " + str([0] * 12), r.stdout[-2000:]
    assert "not available (ModuleNotFoundError)" in r.stdout  # triton / xformers / DALI reported missing


def test_a_missing_extra_is_named_with_its_install_command(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 1.0}\n')
    r = _python(
        _WITHOUT_EXTRAS
        + f"print('rc', main(['viz', 'curves', {str(metrics)!r}, '--out', {str(tmp_path / 'c.png')!r}]))"
    )
    assert "rc 2" in r.stdout and "needs matplotlib" in r.stderr and "pip install 'lafs-fast[viz]'" in r.stderr, (
        r.stdout + r.stderr[-2000:]
    )
