"""fcot.train.checkpoint under faults (issue 21): the run-folder lock, the checkpoint manifest and
the fallback to the newest intact checkpoint, torn metrics lines, a full disk (injected: the
writers are monkeypatched to fail as a full disk makes them fail)."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import fcot  # noqa: E402
from fcot.train import checkpoint as ck  # noqa: E402
from fcot.train.checkpoint import (MANIFEST, CheckpointError, DiskFullError, FolderLock, RunLockedError,  # noqa: E402
                                   check_run, lock_path, read_metrics, verify_checkpoint, write_manifest)
from fcot.train.config import build_config  # noqa: E402
from fcot.train.distill import run_distill  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def _cfg(data, out, seed=None, **training):
    training = {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 5e-3, "use_cpu": True,
                "disable_tqdm": True, "save_strategy": "steps", "save_steps": 2, "lr_scheduler_type": "linear",
                **training}
    seed = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
    return build_config("distill", {"common": {"model": "tiny", "output_dir": str(out), "seed": seed},
                                    "data": {"jsonl": [data], "max_tiles": 1}, "distill": {}, "training": training})


def _losses(out) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _holder(folder: Path):
    """A second process that takes the lock on ``folder`` and keeps it until killed."""
    code = ("import sys, time\nfrom fcot.train.checkpoint import FolderLock\n"
            "FolderLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# --------------------------------------------------------------------------------------------- lock


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(data, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(RunLockedError) as e:
            check_run(_cfg(data, out), resume=False)
        msg = str(e.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "started" in msg
        assert "common.output_dir=" in msg and str(lock_path(out)) in msg
        # the case: `fcot distill` into a folder another run is writing, even with --overwrite
        from fcot.cli import main

        with pytest.raises(SystemExit) as exc:
            main(["distill", "--model", "tiny", "--output-dir", str(out), "--overwrite", "--set", f"data.jsonl={data}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and err[-1].startswith("fcot distill: error: common.output_dir=")
        assert f"is in use by another run: pid {proc.pid}" in err[-1] and not out.exists()
    finally:
        proc.kill()
        proc.wait()
    # the holder is gone: its lock is stale and the run goes ahead
    lock = FolderLock(out).acquire()
    assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path(out).exists()


def test_a_process_that_ends_with_an_error_leaves_no_lock_file(tmp_path):
    code = ("import sys\nfrom fcot.train.checkpoint import FolderLock\n"
            "FolderLock(sys.argv[1]).acquire()\nraise SystemExit('a config error')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.returncode == 1 and "a config error" in proc.stderr
    assert not lock_path(tmp_path / "run").exists()


def test_stale_and_foreign_locks(tmp_path, caplog):
    out = tmp_path / "run"
    path = lock_path(out)
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": 0, "command": "fcot distill"}))
    with caplog.at_level(logging.WARNING, logger="fcot.train"):
        lock = FolderLock(out).acquire()
    assert "stale lock" in caplog.text and "fcot distill" in caplog.text
    lock.release()
    # a live process on this host named in a lock file nobody flocks: refused (a file system without flock)
    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": 0}))
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()}"):
        FolderLock(out).acquire()
    # another host's lock cannot be checked from here: refused, with what to do
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere-node-7", "started": 0}))
    with pytest.raises(RunLockedError, match=f"If no run on elsewhere-node-7 uses the folder, delete {path}"):
        FolderLock(out).acquire()


# --------------------------------------------------------------------------------------------- metrics


def test_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_named(tmp_path, caplog):
    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(g) + "\n" for g in good) + '{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="fcot.train"):
        assert read_metrics(tmp_path) == good
    assert "torn last line 3" in caplog.text
    path.write_text(json.dumps(good[0]) + "\n\xcc\xcc garbage\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: not a metrics line"):
        read_metrics(tmp_path)


def test_a_metrics_write_that_hits_a_full_disk_is_undone(tmp_path, monkeypatch):
    cb = ck.metrics_callback_class()()
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=3, epoch=1.0)
    cb.on_log(args, state, None, logs={"loss": 1.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFullError, match=r"no space left on device: appending to metrics.jsonl in .*needs about"):
        cb.on_log(args, state, None, logs={"loss": 0.5})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # no half line left


def test_disk_full_is_recognised_without_errno(tmp_path, monkeypatch):
    """torch.save reports a full disk as 'unexpected pos', safetensors as a SafetensorError: the free space decides."""
    err = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1152 vs 1046")
    assert ck.is_disk_full(OSError(errno.ENOSPC, "x"), tmp_path)
    monkeypatch.setattr(ck, "free_bytes", lambda folder: 10 << 30)
    assert not ck.is_disk_full(err, tmp_path)
    monkeypatch.setattr(ck, "free_bytes", lambda folder: 4096)
    assert ck.is_disk_full(err, tmp_path)


# --------------------------------------------------------------------------------------------- manifest


def test_manifest_catches_missing_truncated_and_changed_files(tmp_path):
    c = tmp_path / "checkpoint-2"
    c.mkdir()
    (c / "model.safetensors").write_bytes(os.urandom(5000))
    (c / "trainer_state.json").write_text('{"global_step": 2}')
    assert verify_checkpoint(c).endswith("is missing (the save did not finish, or an fcot older than the manifest wrote it)")
    write_manifest(c, step=2)
    assert verify_checkpoint(c) is None
    (c / "trainer_state.json").write_bytes(b"\xcc" * len('{"global_step": 2}'))  # same size, garbage
    assert "trainer_state.json does not match its sha256" in verify_checkpoint(c)
    (c / "trainer_state.json").write_text('{"global_step": 2}')
    with open(c / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    assert "model.safetensors is 100 bytes, the manifest says 5000" in verify_checkpoint(c)
    (c / "model.safetensors").unlink()
    assert verify_checkpoint(c) == f"{c / 'model.safetensors'} is missing"
    (c / MANIFEST).write_text("{not json")
    assert "unreadable" in verify_checkpoint(c)


# --------------------------------------------------------------------------------------------- training runs


def test_resume_never_uses_an_incomplete_checkpoint(data, tmp_path, caplog):
    """The issue's case: the newest checkpoint lost optimizer.pt; resuming from it gave a fresh Adam and a
    restarted LR schedule with rc 0, and different losses. Now it is skipped (moved to .damaged/) and
    checkpoint-2 continues, giving the uninterrupted run's losses; with no intact checkpoint the error
    names each bad file."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    ref = run_distill(_cfg(data, tmp_path / "ref", seed, max_steps=6))
    ref_losses = _losses(tmp_path / "ref")
    assert [s for s, _ in ref_losses] == [1, 2, 3, 4, 5, 6] and not lock_path(tmp_path / "ref").exists()

    class Stop(__import__("transformers").TrainerCallback):  # a run killed after step 4
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                control.should_training_stop = True

    out = tmp_path / "run"
    cfg = _cfg(data, out, seed, max_steps=6)
    run_distill(cfg, callbacks=[Stop()])
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / MANIFEST).is_file() and verify_checkpoint(out / f"checkpoint-{step}") is None
    assert not (out / ".staging").exists() and (out / "model.safetensors").is_file()
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')  # and a torn last metrics line, as a kill mid-write leaves
    leftovers = [out / ".staging" / "checkpoint-5" / "model.safetensors", out / ".fcot_config.yaml.tmp-12345"]
    for path in leftovers:  # what a save killed by a full disk leaves
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fcot.train"):
        resumed = run_distill(cfg, resume=True)
    assert "skipped checkpoint-4" in caplog.text and "optimizer.pt is missing" in caplog.text
    assert (out / ".damaged" / "checkpoint-4").is_dir() and resumed.state.global_step == 6
    assert not any(p.exists() for p in leftovers) and not (out / ".staging").exists()
    got = _losses(out)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([x for _, x in got]), torch.tensor([x for _, x in ref_losses]),
                               rtol=1e-5, atol=1e-7)
    for (n, a), (_, b) in zip(ref.model.model.state_dict().items(), fcot.load_compressed(out).state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    # every checkpoint damaged: an error naming each bad file and how to start over; nothing trains
    with open(out / "checkpoint-6" / "model.safetensors", "r+b") as fh:
        fh.truncate(64)
    with open(out / "checkpoint-4" / "model.safetensors", "r+b") as fh:
        fh.truncate(64)
    state = out / "checkpoint-2" / "trainer_state.json"
    state.write_bytes(b"\xcc" * state.stat().st_size)
    with pytest.raises(CheckpointError) as e:
        run_distill(cfg, resume=True)
    msg = str(e.value)
    assert "checkpoint-4" in msg and "model.safetensors is 64 bytes" in msg
    assert "trainer_state.json does not match its sha256" in msg and "--overwrite" in msg


def test_disk_full_while_saving_keeps_the_last_checkpoint_resumable(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(data, out)
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and "checkpoint-4" in str(f):
            Path(f).write_bytes(b"\0" * 1000)  # what the writer got out before the disk filled
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1152 vs 1046")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(ck, "free_bytes", lambda folder: 1000)
    with pytest.raises(DiskFullError) as e:
        run_distill(cfg)
    msg = str(e.value)
    assert msg.startswith("no space left on device: writing checkpoint-4 in ") and str(out) in msg
    assert "needs about" in msg and "1000 B free" in msg and "checkpoint-2 is complete" in msg and "--resume" in msg
    assert not (out / ".staging").exists() and not (out / "checkpoint-4").exists()
    assert verify_checkpoint(out / "checkpoint-2") is None
    monkeypatch.setattr(torch, "save", real_save)

    # the final model's save fills the disk: nothing half-written in the run folder
    def full_final(obj, f, *args, **kwargs):
        if "final" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_final)
    with pytest.raises(DiskFullError, match="writing the final model in .*checkpoint-4 is complete"):
        run_distill(cfg, resume=True)
    assert not (out / ".staging").exists() and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    done = run_distill(cfg, resume=True)  # the disk has room again: training is complete, the model is written
    assert done.state.global_step == 4 and [s for s, _ in _losses(out)] == [1, 2, 3, 4]
    fcot.load_compressed(out)
    assert not lock_path(out).exists()
