"""The `lafs-fast` entry: help, info, unknown commands."""

import json
import subprocess
import sys


def lafs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lafs_fast.cli", *args], capture_output=True, text=True)


def test_help_lists_commands():
    r = lafs("--help")
    assert r.returncode == 0 and "info" in r.stdout and "config" in r.stdout and "checkpoint" in r.stdout


def test_unknown_command_exit_2():
    r = lafs("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_info_json_reports_versions_and_backends():
    r = lafs("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("torch", "triton", "xformers", "nvidia.dali", "timm"):
        assert key in info
    assert info["backends"]["patch sampler"].startswith(("torch", "triton"))
    assert info["backends"]["attention"].split()[0] in ("sdpa", "xformers", "math")
    assert info["backends"]["view augmentation"].startswith(("torch", "triton"))
    assert info["backends"]["data loader"].split()[0] in ("dali", "nvjpeg", "pil")


def test_every_command_builds_its_parser():
    """Each command's module imports and its --help parser builds (in-process: no subprocess each)."""
    from lafs_fast.cli import COMMANDS, build_parser

    for name in COMMANDS:
        parser, module = build_parser(name)
        assert parser.format_help().startswith(f"usage: lafs-fast {name}")
        assert callable(module.run)
