"""Issue 25 items 4 and 5: one sentence for every fault of the machine at a path the user chose (a
name too long, a full disk, a read-only mount), and records that tell the truth (metrics.jsonl cut
back on --resume, a torn line dropped, train.log holding how a run ended, --resume's value)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from lafs_fast.errors import is_user_error, parse_command_line, run_command, user_message
from tests import TINY_PRETRAIN
from tests.test_engine import _cfg, _engine

LONG = "x" * 300  # one path component over the 255-byte limit of every common file system


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from lafs_fast.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "build", "{orl}", "{tmp}/" + LONG],
        ["data", "verify", "{tmp}/" + LONG + ".rec"],
        ["embed", "{orl}/s1", "--model", "{tmp}/m.pt", "--out", "{tmp}/" + LONG + ".npz"],
        ["eval", "{tmp}/m.pt", "{tmp}/" + LONG + ".bin"],
        ["pretrain", "--config", "{tmp}/" + LONG + ".yaml", "--out", "{tmp}/r"],
        ["pretrain", "--data", "{tmp}/" + LONG, "--out", "{tmp}/r"],
    ],
    ids=["data-build", "data-verify", "embed-out", "eval", "config", "data"],
)
def test_a_name_over_the_limit_is_one_sentence(argv, tmp_path, orl_dir, capsys):
    import shutil

    for who in ("s1", "s2"):  # two identities of one face each
        (tmp_path / "src" / who).mkdir(parents=True)
        shutil.copy(orl_dir / who / "1.pgm", tmp_path / "src" / who)
    rc, err = _cli([a.format(tmp=tmp_path, orl=tmp_path / "src") for a in argv], capsys)
    assert rc == 2 and err.count("\n") == 1 and "too long for the file system" in err, err
    assert "Traceback" not in err and "Errno" not in err


@pytest.mark.parametrize(
    "no, words",
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EDQUOT, "quota"),
        (errno.EROFS, "read-only"),
        (errno.EFBIG, "ulimit -f"),
        (errno.ENAMETOOLONG, "too long"),
    ],
)
def test_the_machine_refusing_a_path_is_one_sentence_and_exit_2(no, words, capsys):
    """A full disk at the run lock, data build into a read-only mount: plain OSErrors, not in the
    user-error classes, each ended in a traceback."""
    import argparse
    import os

    def run(args):
        raise OSError(no, os.strerror(no), "/runs/a/.lafs-fast.lock")

    assert run_command("lafs-fast x", argparse.ArgumentParser(), run, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "/runs/a/.lafs-fast.lock" in err, err
    assert is_user_error(OSError(no, "x")) and words in user_message(OSError(no, os.strerror(no)))
    with pytest.raises(OSError):  # other OSErrors (a bug, a broken disk) keep their traceback
        run_command(
            "lafs-fast x", argparse.ArgumentParser(), lambda a: (_ for _ in ()).throw(OSError(errno.EIO, "io")), []
        )


def test_a_torn_iostream_write_reads_as_the_full_disk(tmp_path, monkeypatch):
    from lafs_fast.io import atomic_save

    def full(obj, f):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ValueError, match=r"cannot write .*ckpt.pt: the disk is full"):
        atomic_save({"a": 1}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def test_eval_refuses_a_nan_far(capsys):
    with pytest.raises(SystemExit) as e:
        _cli(["eval", "m.pt", "x.bin", "--far", "nan"], capsys)
    assert e.value.code == 2 and "argument --far: must be in (0, 1], got nan" in capsys.readouterr().err


def test_a_refused_pickle_gives_no_advice_to_load_it(tmp_path):
    """A pre-zip pickle: torch's refusal begins with "Re-running torch.load with weights_only set to
    False will likely succeed", which safe_load relayed; a REDUCE of eval was named "GLOBAL"."""
    import pickle

    from lafs_fast.io import safe_load

    class Evil:
        def __reduce__(self):
            return (eval, ("1",))

    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(ValueError) as e:
        safe_load(legacy)
    msg = str(e.value)
    assert "not a loadable PyTorch checkpoint" in msg and "weights_only" not in msg and "\n" not in msg, msg
    torch.save({"a": Evil()}, tmp_path / "zip.pt")
    with pytest.raises(ValueError, match="the Python global eval,"):
        safe_load(tmp_path / "zip.pt")


# --------------------------------------------------------------------------------------------- records


def test_a_metrics_line_is_whole_or_absent_on_a_full_disk(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the write that crosses it is cut short; the line it
    began is taken back, and the error is the one sentence."""
    script = textwrap.dedent(
        f"""
        import resource
        from pathlib import Path
        from lafs_fast.errors import user_message
        from lafs_fast.train.run_folder import append_line
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        path = Path({str(tmp_path / "metrics.jsonl")!r})
        try:
            for step in range(1, 1000):
                append_line(path, '{{"step": %d, "loss": 0.123456789}}\\n' % step)
        except OSError as exc:
            print(user_message(exc))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "metrics.jsonl" in out.stdout and "ulimit -f" in out.stdout, out.stdout
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(x)["step"] for x in text.splitlines()] == list(
        range(1, len(text.splitlines()) + 1)
    )


def test_resume_cuts_the_metrics_log_back_to_its_step(tmp_path, capsys):
    """kill -9 after step 3 with the last checkpoint at step 2: the resumed run logged step 3 again."""
    _engine(_cfg(tmp_path, "train.max_steps=3", "train.ckpt_every_steps=2")).fit()
    (tmp_path / "ckpt-00000003.pt").unlink()  # the kill came before the final checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # and cut a line short
    _engine(_cfg(tmp_path, "train.max_steps=4", "train.ckpt_every_steps=2"), resume="auto").fit()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    out = capsys.readouterr()
    assert "after step 2" in out.out and "not whole JSON" in out.err


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint to continue; start a new run without --resume"):
        _engine(_cfg(tmp_path, "train.max_steps=1"), resume="auto")


def test_an_override_after_resume_is_an_override():
    import argparse

    from lafs_fast.train import pretrain

    p = argparse.ArgumentParser()
    pretrain.add_arguments(p)
    args = parse_command_line(p, ["--out", "R", "--resume", "optim.lr=1", "--max-steps", "2"])
    assert (args.resume, args.overrides) == ("auto", ["optim.lr=1"])
    args = parse_command_line(p, ["--out", "R", "--resume", "R/ckpt-00000002.pt"])
    assert args.resume == "R/ckpt-00000002.pt"


def test_viz_drops_a_torn_last_line_with_a_warning(tmp_path, capsys):
    from lafs_fast.eval.viz import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "dropped its last line" in capsys.readouterr().err
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')  # not at the end: not a cut-short write
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_metrics(path)


def test_embed_refuses_to_write_over_its_model(tmp_path, capsys):
    model = tmp_path / "m.npz"
    model.write_bytes(b"the model")
    (tmp_path / "faces").mkdir()
    rc, err = _cli(["embed", str(tmp_path / "faces"), "--model", str(model), "--out", str(model)], capsys)
    assert rc == 2 and "is the --model file" in err and model.read_bytes() == b"the model"


def test_a_folder_source_is_not_sent_to_data_verify():
    from lafs_fast.data.base import read_items
    from lafs_fast.data.recordio import RecordIOError

    class Folder:
        kind, path = "folder", "/faces"

        def item(self, p):
            raise OSError("cannot identify image file")

        def name(self, p):
            return f"/faces/{p}.jpg"

    with pytest.raises(RecordIOError) as e:
        read_items(Folder(), [0], iter(range(1, 1000)))
    assert "data verify" not in str(e.value) and "image files named in the warnings" in str(e.value)


def test_train_log_holds_how_the_run_ended(tmp_path):
    from lafs_fast.config import config_to_dict, load_config
    from lafs_fast.train import pretrain

    (tmp_path / "train.log").write_text("")  # an earlier run's folder without checkpoints
    cfg = load_config("small", None, [*TINY_PRETRAIN, f"train.out_dir={tmp_path}", "train.max_steps=1"])
    with pytest.raises(FileNotFoundError):
        pretrain.train_worker(config_to_dict(cfg), {"knn": False, "progress": False, "resume": "auto"})
    assert "error: --resume: " in (tmp_path / "train.log").read_text()


def test_a_build_clears_what_a_killed_build_left_and_refuses_a_concurrent_one(tmp_path):
    """A killed `data build` left its 25 MB temporary behind for good; two builds at once into one
    folder would swap each other's files."""
    import fcntl
    import os

    from lafs_fast.data.recordio import IRHeader
    from lafs_fast.data.recordio_writer import RecordIOWriter

    out = tmp_path / "ds"
    out.mkdir()
    left = [out / "train.rec.tmp999999999", out / "train.idx.tmp999999999", out / ".lafs-abcd1234.tmp"]
    for p in left:
        p.write_bytes(b"x" * 100)
    keep = out / "notes.tmp1"  # not one of a build's names
    keep.write_text("mine")
    with RecordIOWriter(out) as w:
        w.write(1, IRHeader(0, 0.0, 1, 0), b"img")
    assert not any(p.exists() for p in left) and keep.exists() and (out / "train.rec").is_file()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another build holds the folder
    try:
        with pytest.raises(FileExistsError, match="another process is writing a dataset into"):
            RecordIOWriter(out, overwrite=True)
    finally:
        os.close(fd)
    with pytest.raises(FileExistsError, match="already exists"):
        RecordIOWriter(out)
    RecordIOWriter(out, overwrite=True).abort()  # the refusal above let go of the folder


# --------------------------------------------------------------------------------------------- SIGTERM


@pytest.mark.timeout(60)
def test_sigterm_during_the_first_step_stops_at_once(tmp_path):
    """Issue 24: a first step that compiles for minutes ignored SIGTERM until it ended (the flag is
    read between steps); now the run stops at once, with nothing new to save."""
    import os
    import signal
    import threading
    import time

    from lafs_fast.train.engine import Preempted
    from tests.test_engine import Regression

    class Slow(Regression):
        def forward_loss(self, model, batch, ctx):
            if ctx.step == 0:
                time.sleep(30)  # a compile
            return super().forward_loss(model, batch, ctx)

    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.time()
    with pytest.raises(Preempted, match=r"during step 1, the first of this run, before it ended; nothing was saved"):
        _engine(_cfg(tmp_path, "train.max_steps=2"), stage=Slow()).fit()
    assert time.time() - t0 < 10 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


@pytest.mark.timeout(200)
def test_sigterm_to_a_two_rank_job_is_exit_143_with_the_step_saved(tmp_path):
    """The launcher raised torch's SignalException: exit 1 with a traceback, though the workers had
    saved the step reached."""
    import os
    import signal
    import time
    from pathlib import Path

    from lafs_fast.train.checkpointing import list_checkpoints, load_checkpoint
    from tests.test_pretrain_dist import TINY

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lafs_fast.train.pretrain", "--device", "cpu", "--gpus", "2", "--no-knn"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [*cmd, "--no-progress", "--out", str(out), *TINY, "optim.epochs=500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
        env=env,
    )
    metrics, t0 = out / "metrics.jsonl", time.time()
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() - t0 < 150:
        assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    step = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    assert load_checkpoint(list_checkpoints(out)[-1])["step"] == step
    assert "stopped: stopped by SIGTERM at step" in (out / "train.log").read_text()


_ONE_RANK = """
import torch.distributed as dist
from lafs_fast.launch import RankFailed, init_distributed, launch


def worker(_):
    info = init_distributed("cpu", timeout_s=60)
    if info.rank == 1:
        import time

        time.sleep(1)  # rank 0 waits in the barrier, and loses its peer
        raise ValueError("rank 1 alone is wrong")
    dist.barrier()


if __name__ == "__main__":
    try:
        launch(worker, (0,), 2)
    except RankFailed as e:
        print("FAILED", e.user_error, e)
"""


@pytest.mark.timeout(120)
def test_only_the_rank_that_failed_speaks(tmp_path):
    """Rank 0 lost its peer in a collective and printed a 40-line traceback before rank 1's one
    sentence; the launcher also read only the first failure's record and blamed a silent death."""
    import os
    from pathlib import Path

    script = tmp_path / "one_rank.py"
    script.write_text(_ONE_RANK)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=root, env=env)
    assert "FAILED True rank 1 of 2: rank 1 alone is wrong" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


_BAD_MODELS = {
    "no-model": {"backbone": {}},
    "model-a-string": {"model": "x", "backbone": {}},
    "unknown-setting": {"model": {"foo": 1}, "backbone": {}},
    "negative-dim": {"model": {"dim": -3}, "backbone": {}},
    "backbone-none": {"model": {"dim": 32}, "backbone": None},
    "backbone-a-list": {"model": {"dim": 32}, "backbone": [1]},
    "landmarks-a-string": {"model": {"dim": 32}, "backbone": {}, "landmark_cnn": "x"},
    "head-without-weight": {"model": {"dim": 32}, "backbone": {}, "landmark_cnn": {}, "margin_head": {}},
}


@pytest.mark.parametrize("name", list(_BAD_MODELS))
def test_a_malformed_model_file_is_one_sentence(name, tmp_path, capsys):
    """KeyError, TypeError or AttributeError in checkpoint show, eval and embed before."""
    from lafs_fast.eval.loading import load_eval_model
    from lafs_fast.models.checkpoints import FORMAT

    path = tmp_path / f"{name}.pt"
    torch.save({"format": FORMAT, **_BAD_MODELS[name]}, path)
    with pytest.raises(ValueError, match=rf"{name}.pt is a malformed lafs-fast model file: "):
        load_eval_model(path)  # what eval and embed load with
    for argv in (
        ["checkpoint", "show", str(path)],
        ["embed", str(tmp_path), "--model", str(path), "--out", str(tmp_path / "e.npz")],
    ):
        rc, err = _cli(argv, capsys)
        assert rc == 2 and err.count("\n") == 1 and "malformed lafs-fast model file" in err, err


def test_a_reference_file_with_a_scalar_tensor_is_one_sentence(tmp_path):
    from lafs_fast.eval.loading import load_eval_model

    torch.save({"cls_token": torch.tensor(1.0), "pos_embedding": torch.zeros(1)}, tmp_path / "ref.pt")
    with pytest.raises(ValueError, match="ref.pt: checkpoint from another architecture"):
        load_eval_model(tmp_path / "ref.pt")


def test_a_stage_that_fails_on_nan_weights_is_the_non_finite_stop(tmp_path):
    """finetune optim.lr=1e30: the landmark CNN's weights went NaN and the sampler's "coords contain
    NaN or inf" ended the run instead of the non-finite-loss stop naming the step."""
    from lafs_fast.train.engine import NonFiniteLoss
    from tests.test_engine import Regression

    class Blows(Regression):
        def forward_loss(self, model, batch, ctx):
            w = self.model[0].weight
            torch._assert_async(torch.isfinite(w).all(), "coords contain NaN or inf: check the landmark network")
            return super().forward_loss(model, batch, ctx)

        def after_optimizer_step(self, model, ctx):
            super().after_optimizer_step(model, ctx)
            if ctx.step == 1:
                with torch.no_grad():
                    self.model[0].weight.fill_(float("nan"))  # what lr=1e30 does in one update

    with pytest.raises(NonFiniteLoss, match=r"parameters became non-finite before step 3 \(epoch 0\)"):
        _engine(_cfg(tmp_path, "train.max_steps=4"), stage=Blows()).fit()


def test_sizes_no_machine_can_hold_are_one_sentence(tmp_path):
    """A property claiming 10^12 classes, --epochs 10^9, model.dim=10^9: an allocator traceback, or
    minutes at 24 GB RSS before the first step."""
    from lafs_fast.config import load_config
    from lafs_fast.models.part_fvit import build_backbone
    from lafs_fast.train.supervised_model import _margin_head

    with pytest.raises(ValueError, match=r"the per-step schedules of 1,000,000,000,000 epochs x 6 steps would need"):
        _engine(_cfg(tmp_path, "optim.epochs=1000000000000"))
    cfg = load_config("small", None, ["model.dim=10000000000"])
    with pytest.raises(ValueError, match=r"a backbone of .* G parameters \(model.dim=10000000000.*lower model.dim"):
        build_backbone(cfg.model)
    cfg = load_config("small", None, [])
    with pytest.raises(ValueError, match=r"a margin head of 1,000,000,000,000 classes .*property file"):
        _margin_head(cfg, 10**12)
    assert _margin_head(cfg, 10).weight.shape[0] == 10


def _jpeg(w: int, h: int, claim: tuple[int, int] | None = None) -> bytes:
    """A w x h JPEG; ``claim``: the (w, h) its header states instead (a 144-megapixel bomb in a few KB)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    if claim is not None:
        at = data.index(b"\xff\xc0")  # SOF0: length (2), precision (1), height (2), width (2)
        data[at + 5 : at + 9] = claim[1].to_bytes(2, "big") + claim[0].to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize(
    "odd, reason",
    [((128, 128, None), "128 x 128, not the 112 x 112"), ((112, 112, (12000, 12000)), "144 megapixels")],
    ids=["128-in-112", "144-megapixels"],
)
def test_an_oversized_image_is_a_corrupt_record_everywhere(odd, reason, tmp_path, caplog):
    """data verify accepted it; the default loader crashed (DALI: tensors not the same shape)."""
    from lafs_fast.data import make_loader
    from lafs_fast.data.folder import build_rec
    from lafs_fast.data.recordio_writer import write_identity_dataset
    from lafs_fast.data.tools import verify_rec

    w, h, claim = odd
    faces = [[_jpeg(112, 112) for _ in range(4)] for _ in range(2)]
    faces[1][2] = _jpeg(w, h, claim)
    write_identity_dataset(tmp_path / "rec", faces, height=112, width=112)
    corrupt = verify_rec(tmp_path / "rec", progress=False)["corrupt"]
    assert [k for k, _, _ in corrupt] == [7] and reason in corrupt[0][2]
    for backend in ("pil", "dali"):
        loader = make_loader(
            str(tmp_path / "rec"), 4, shuffle=False, backend=backend, max_bad_fraction=0.5, device=torch.device("cpu")
        )
        assert all(images.shape[0] == 4 for images, _ in loader)
        assert any("skipped a corrupt record" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
        caplog.clear()
    src = tmp_path / "src"
    for who, data in (("a", _jpeg(112, 112)), ("b", _jpeg(w, h, claim))):
        (src / who).mkdir(parents=True)
        (src / who / "1.jpg").write_bytes(data)
    if claim is not None:  # data build decodes (and resizes) any size under the pixel cap
        for keep_jpeg in (False, True):  # --keep-jpeg decodes the JPEG it keeps: the same cap first
            report = build_rec(src, tmp_path / f"built{keep_jpeg}", progress=False, keep_jpeg=keep_jpeg)
            assert len(report["skipped"]) == 1 and reason in report["skipped"][0][1]


def test_the_jpeg_header_walk_agrees_with_pil(orl_dir):
    import io

    from PIL import Image

    from lafs_fast.data.recordio import _jpeg_size

    for w, h, progressive in ((112, 112, False), (128, 96, True), (7, 300, False)):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (9, 99, 199)).save(buf, "JPEG", progressive=progressive)
        data = buf.getvalue()
        assert _jpeg_size(data) == _jpeg_size(memoryview(data)) == Image.open(buf).size == (w, h)
    assert _jpeg_size((orl_dir / "s1" / "1.pgm").read_bytes()) is None  # not a JPEG: PIL reads it
    assert _jpeg_size(b"\xff\xd8\xff") is None  # cut short


@pytest.mark.parametrize("limit, where", [(0, ".lafs-fast.lock"), (4000, "ckpt-00000002.pt")], ids=["lock", "ckpt"])
def test_a_full_disk_during_a_run_is_one_sentence(limit, where, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: at the run lock (a traceback before) and at the first
    checkpoint; the metrics log keeps whole lines only."""
    import os
    import resource
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    argv = ["--out", str(out), "--no-knn", "--no-progress", *TINY_PRETRAIN, "train.ckpt_every_steps=2"]
    r = subprocess.run(
        [sys.executable, "-m", "lafs_fast.train.pretrain", *argv, "--max-steps", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    err = r.stderr.strip()
    assert r.returncode == 2 and err.count("\n") == 0 and where in err and "Traceback" not in err, err
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        assert metrics.read_text().endswith("\n")
        assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()]


def test_a_train_log_the_disk_refuses_is_given_up_with_one_warning(tmp_path, capsys):
    """logging printed '--- Logging error ---' and a traceback for every line after the disk filled."""
    import logging

    from lafs_fast.logs import log_to_file, start_run_logging, stop_run_logging

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    log = start_run_logging(0)
    try:
        log_to_file(tmp_path / "train.log")
        logging.getLogger("lafs_fast.x").info("before")
        handler = next(h for h in log.handlers if isinstance(h, logging.FileHandler))
        handler.stream = Full()
        for i in range(3):
            logging.getLogger("lafs_fast.x").info("line %d", i)
        assert not any(isinstance(h, logging.FileHandler) for h in log.handlers)
    finally:
        stop_run_logging()
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert err.count("cannot write (no space left on device); from here on") == 1, err
    assert "before" in (tmp_path / "train.log").read_text()


def test_train_log_holds_python_warnings_said_during_a_run(tmp_path, capsys):
    import warnings

    from lafs_fast.logs import log_to_file, start_run_logging, stop_run_logging

    start_run_logging(0)
    try:
        log_to_file(tmp_path / "train.log")
        warnings.warn("a library's complaint", UserWarning, stacklevel=1)
    finally:
        stop_run_logging()
    assert "UserWarning: a library's complaint" in (tmp_path / "train.log").read_text()
    assert "a library's complaint" in capsys.readouterr().err  # still on the terminal, once
    with warnings.catch_warnings(record=True) as seen:  # after the run: Python's own handling again
        warnings.simplefilter("always")
        warnings.warn("later", UserWarning, stacklevel=1)
    assert len(seen) == 1


def _mount_tmpfs(where, options: str) -> None:
    """A small tmpfs at ``where`` (a real full disk / read-only mount), or skip where root may not mount."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")


@pytest.fixture
def small_disks(tmp_path):
    """(a 256 KB tmpfs, a read-only tmpfs); unmounted after the test."""
    full, ro = tmp_path / "full", tmp_path / "ro"
    _mount_tmpfs(full, "size=256k")
    try:
        _mount_tmpfs(ro, "size=64k,ro")
    except BaseException:
        subprocess.run(["umount", str(full)], check=False)
        raise
    yield full, ro
    for m in (full, ro):
        subprocess.run(["umount", str(m)], check=False)


def test_data_build_onto_a_full_or_read_only_disk_is_one_sentence(small_disks, orl_dir, capsys):
    """A traceback each before; the full disk also left its 256 KB temporary behind."""
    full, ro = small_disks
    for out, words in ((ro / "ds", "the file system is read-only"), (full / "ds", "the disk is full")):
        rc, err = _cli(["data", "build", str(orl_dir), str(out), "--size", "112"], capsys)
        last = err.strip().splitlines()[-1]  # after the progress bar
        assert rc == 2 and last.startswith("lafs-fast data: error: ") and words in last and "Traceback" not in err, err
    assert "ds/train.rec" in err and list((full / "ds").iterdir()) == []


def test_a_run_onto_a_full_disk_keeps_whole_records(small_disks):
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = small_disks[0] / "run"
    r = subprocess.run(
        [sys.executable, "-m", "lafs_fast.train.pretrain", "--out", str(out), "--no-knn", "--no-progress"]
        + [*TINY_PRETRAIN, "optim.epochs=30", "--max-steps", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    err = r.stderr.strip()
    assert r.returncode == 2 and err.count("\n") == 0 and "the disk is full" in err, err
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(x)["step"] for x in text.splitlines())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_sigterm_while_a_command_sets_up_is_one_line_and_exit_143(tmp_path):
    """Before the engine's handler (building the model, reading the data, the check before), SIGTERM
    killed the process without a word; training_process now stops it as Preempted (exit 143)."""
    import os
    import signal

    from lafs_fast.config import load_config
    from lafs_fast.train.cli_common import training_process
    from lafs_fast.train.engine import Preempted

    cfg = load_config("small", None, [*TINY_PRETRAIN, f"train.out_dir={tmp_path}"])
    with pytest.raises(Preempted, match="stopped by SIGTERM outside the training steps"), training_process(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_rank_stopped_because_another_failed_is_not_blamed():
    """The agent sends SIGTERM to the ranks still running when one fails; they record Preempted, which
    must not hide the rank that failed (killed without a word, or a bug)."""
    from lafs_fast.launch import _rank_failure

    stopped = {"type": "Preempted", "user_error": False, "message": "stopped by SIGTERM at step 3", "peer_lost": False}
    bug = {"type": "RuntimeError", "user_error": False, "message": "boom", "peer_lost": False}
    assert "rank 1 of 2 failed: it stopped answering" in str(_rank_failure({0: stopped}, {0: None, 1: None}, 2))
    e = _rank_failure({0: stopped, 1: bug}, {0: None, 1: None}, 2)
    assert (e.rank, e.error_type) == (1, "RuntimeError")
    e = _rank_failure({0: stopped, 1: stopped}, {0: None, 1: None}, 2)  # a scheduler stopped them all
    assert (e.rank, e.error_type) == (0, "Preempted")
