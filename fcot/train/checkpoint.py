"""The run folder: its lock, the metrics JSONL, atomic checkpoints with a manifest, resume, the
final model and the data summary. :class:`AtomicCheckpoints` is mixed into
:class:`fcot.train.trainer.FcotTrainer`.

Lock: a run holds ``.<output_dir name>.lock`` next to its folder (an ``flock`` on a file that
names the holder: pid, host, start time, command) from :func:`check_run` to :func:`finish_run`, so
a second run into the same folder is refused with the holder's name. The kernel drops the
``flock`` when its process dies, so the file a killed run leaves is stale and taken over with a
warning; a file that names a live process on this host, or any process on another host, is not.

Checkpoints: ``Trainer`` writes ``checkpoint-N`` in place, so a run killed while saving leaves
a partial folder that ``resume_from_checkpoint=True`` would pick (it takes the highest N).
:class:`AtomicCheckpoints` writes each checkpoint into ``output_dir/.staging/checkpoint-N``
(every rank writes its part there); the main process then fsyncs every file, writes
``fcot_manifest.json`` (each file's size, and the sha256 of the small ones) as the last file, and
renames the folder into ``output_dir`` (one ``os.replace`` of a folder: atomic on one file system)
and rotates old ones. On resume a checkpoint is used only if its manifest matches its files
(:func:`verify_checkpoint`): the newest intact one is taken, newer damaged ones are moved to
``output_dir/.damaged/`` with a warning that says why. A full disk while saving removes the
partial write and raises :class:`DiskFullError` (the folder, the bytes needed and free, and the
checkpoint ``--resume`` continues from). The model part of a checkpoint is the compressed model's
``save_pretrained`` (with its ``config.fcot`` section), so every checkpoint, and the final model in
``output_dir``, loads with :func:`fcot.load_compressed`.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from fcot.train.config import ConfigError, RunConfig, check_output_dir, save_config

logger = logging.getLogger("fcot.train")

METRICS_FILE = "metrics.jsonl"
STAGING = ".staging"
DAMAGED = ".damaged"
MANIFEST = "fcot_manifest.json"
HASH_LIMIT = 16 << 20
"""Files up to this size get a sha256 in the manifest (configs, trainer state, scheduler, RNG);
larger ones (weights, optimizer) are checked by size, which catches truncation at no read cost."""
LOW_SPACE = 64 << 20
"""Less free space than this after a failed write means the disk is full (PyTorch's and
safetensors' writers report a full disk as 'unexpected pos' or a SafetensorError, without ENOSPC)."""


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class RunLockedError(ConfigError):
    """Another process holds the folder's lock; the message names it and what to do."""


class CheckpointError(ConfigError):
    """No intact checkpoint to resume from; the message names the bad file and how to start over."""


class DiskFullError(OSError):
    """A write ran out of space; the message names the folder, the bytes needed and what is still usable."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.args[1]


class DamagedFileError(ValueError):
    """A file that cannot be read as what it should be (truncated, empty, garbage); names it and the fix."""


def damaged_file_error(path: str | os.PathLike, error: BaseException | str) -> DamagedFileError:
    size = os.path.getsize(path) if os.path.exists(path) else None
    return DamagedFileError(f"{path} is damaged ({size} bytes; {error}): it is truncated or not the file it should be; "
                            "copy or save it again from its source (or leave that model/checkpoint out)")


def check_safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """Every ``*.safetensors`` file of a model folder opens (its header parses and covers the
    file: no truncation), read from the headers only; a damaged one is a :class:`DamagedFileError`
    naming it. Returns the files."""
    from safetensors import SafetensorError, safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    for path in files:
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise damaged_file_error(path, e) from None
    return files


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free space (for this user) on the file system that holds ``folder`` or its nearest existing parent."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(error: BaseException, folder: str | os.PathLike) -> bool:
    """Whether ``error`` (raised while writing into ``folder``) is the disk running out of space:
    ENOSPC anywhere in its chain, or too little space left there now."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    free = free_bytes(folder)
    return free is not None and free < LOW_SPACE


# ---------------------------------------------------------------------------------------------
# The lock on a folder
# ---------------------------------------------------------------------------------------------


def lock_path(folder: str | os.PathLike) -> Path:
    """``.<name>.lock`` next to ``folder`` (outside it, so clearing the folder keeps the lock)."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _holder_text(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when} ({info.get('command', '?')})"


class FolderLock:
    """An exclusive lock on a folder for this process (see the module docstring). ``what`` names
    the folder in messages (``common.output_dir='runs/a'``). Taking a lock this process already
    holds returns it (re-entrant: each :meth:`release` undoes one :meth:`acquire`; ``force`` drops
    it whatever the count)."""

    _held: dict[str, "FolderLock"] = {}

    def __init__(self, folder: str | os.PathLike, what: str | None = None):
        self.folder = Path(folder)
        self.path = lock_path(folder)
        self.what = what or repr(str(folder))
        self._fd: int | None = None
        self._depth = 0

    def acquire(self) -> "FolderLock":
        key = str(self.path)
        held = FolderLock._held.get(key)
        if held is not None and held._fd is not None:
            held._depth += 1
            return held
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _try_flock(fd):
                    raise RunLockedError(self._busy_message(_read_info(fd)))
                # A holder that released (unlinked) the file between our open and flock: retry on the new file.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = _read_info(fd)
                if previous:
                    self._check_stale(previous)
                prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
                info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                        "command": " ".join(["fcot" if prog == "__main__.py" else prog, *sys.argv[1:]])[:300]}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
                self._fd, self._depth = fd, 1
                if not FolderLock._held:
                    atexit.register(_release_all)  # a run that fails leaves no lock file behind
                FolderLock._held[key] = self
                return self
            except BaseException:
                if self._fd != fd:
                    os.close(fd)
                raise
        raise RunLockedError(f"{self.what}: could not take the lock {self.path} (it keeps changing); try again")

    def _check_stale(self, info: dict[str, Any]) -> None:
        host, pid = info.get("host"), info.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
            # flock is free but the named process lives: a file system without working flock. Be safe.
            raise RunLockedError(self._busy_message(info))
        if host != socket.gethostname():
            raise RunLockedError(
                f"{self.what} was locked by {_holder_text(info)}, and that lock was never released; this host "
                f"cannot tell whether that run still lives. If no run on {host} uses the folder, delete {self.path} "
                "and start again")
        logger.warning("%s: taking over the stale lock %s of %s (that process is gone; it was killed or crashed)",
                       self.what, self.path, _holder_text(info))

    def _busy_message(self, info: dict[str, Any]) -> str:
        holder = _holder_text(info) if info else "another process"
        return (f"{self.what} is in use by another run: {holder}. Wait for it to finish, stop it, or choose another "
                f"folder. The lock is {self.path}: a lock whose process is gone is taken over automatically; delete "
                "it by hand only if that run is on another host and is no longer running")

    def release(self, *, force: bool = False) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0 and not force:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiter that opened the old file sees it is gone
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        FolderLock._held.pop(str(self.path), None)

    def __enter__(self) -> "FolderLock":
        self._entered = self.acquire()  # the lock this process already holds, when it does
        return self._entered

    def __exit__(self, *exc) -> None:
        self._entered.release()


def _release_all() -> None:
    for lock in list(FolderLock._held.values()):
        lock.release(force=True)


def _try_flock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: the holder's pid decides (see _check_stale)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _read_info(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}
    return info if isinstance(info, dict) else {}


def run_lock(output_dir: str | os.PathLike) -> FolderLock | None:
    """The lock this process holds on ``output_dir`` (None when it holds none)."""
    return FolderLock._held.get(str(lock_path(output_dir)))


# ---------------------------------------------------------------------------------------------
# Metrics JSONL
# ---------------------------------------------------------------------------------------------


def _parse_jsonl(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Lines and entries of a metrics file. A torn last line (what a full disk or a power loss
    leaves) is dropped with a warning; a bad line before the last is an error naming it."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    entries = []
    for n, ln in enumerate(lines, 1):
        try:
            entry = json.loads(ln)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(lines):
                logger.warning("%s: dropping its torn last line %d (%s): a write the run did not finish", path, n, e)
                return lines[:-1], entries
            raise ConfigError(f"{path}:{n}: not a metrics line ({e}); delete that line (or the file) to go on") from None
        entries.append(entry)
    return lines, entries


def metrics_callback_class():
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Appends every log (loss, learning rate, grad norm, ...) to ``output_dir/metrics.jsonl``
        as one JSON line with ``step``, ``epoch`` and ``time``, flushed and fsynced. On resume, lines
        past the checkpoint's step (written before the interruption) are dropped first, so the file
        is the run's one sequence; a torn last line is dropped too. A write that fails (a full
        disk) is undone: the file is cut back to its last complete line."""

        def on_train_begin(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / METRICS_FILE
            if state.is_world_process_zero and path.exists():
                lines, entries = _parse_jsonl(path)
                kept = [ln for ln, e in zip(lines, entries) if e.get("step", 0) <= state.global_step]
                tmp = path.with_suffix(".tmp")
                try:
                    tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
                    os.replace(tmp, path)
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    raise_if_disk_full(e, path.parent, f"rewriting {path}", needed=path.stat().st_size)
                    raise

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            entry = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            path = Path(args.output_dir) / METRICS_FILE
            data = (json.dumps(entry) + "\n").encode("utf-8")
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError as e:
                    os.ftruncate(fd, size)  # no half line left behind
                    raise_if_disk_full(e, path.parent, f"appending to {path.name}", needed=len(data),
                                      resume_from=_newest_intact(args.output_dir))
                    raise
            finally:
                os.close(fd)

    return MetricsCallback


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a run's ``metrics.jsonl`` (a torn last line dropped, with a warning)."""
    return _parse_jsonl(Path(output_dir) / METRICS_FILE)[1]


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # folders on some file systems
            raise
    finally:
        os.close(fd)


def write_manifest(folder: str | os.PathLike, *, step: int | None = None) -> Path:
    """fsync every file of ``folder``, then write ``fcot_manifest.json`` (relative path -> size, and
    sha256 up to :data:`HASH_LIMIT`) atomically and fsync it: the last step of a checkpoint's save."""
    folder = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    for path in _files(folder):
        _fsync(path)
        size = path.stat().st_size
        files[path.relative_to(folder).as_posix()] = {"size": size, "sha256": _sha256(path) if size <= HASH_LIMIT else None}
    out, tmp = folder / MANIFEST, folder / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"format": 1, "step": step, "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    _fsync(folder)
    return out


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """None if ``folder``'s files match its manifest; else why not, naming the file."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return f"{path} is missing (the save did not finish, or an fcot older than the manifest wrote it)"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{path} is unreadable ({type(e).__name__}: {e})"
    for rel, want in sorted(files.items()):
        f = folder / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want.get("size"):
            return f"{f} is {size} bytes, the manifest says {want.get('size')} (truncated or replaced)"
        if want.get("sha256") and _sha256(f) != want["sha256"]:
            return f"{f} does not match its sha256 in the manifest (its content changed)"
    return None


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in _files(Path(folder)))


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def disk_full_error(error: BaseException, folder: str | os.PathLike, what: str, *, needed: int | None,
                    resume_from: str | None = None) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``error`` (raised by a write into ``folder``) if the disk is
    full, else None. Call it before cleaning up: removing the partial write frees space."""
    if not is_disk_full(error, folder):
        return None
    free = free_bytes(folder)
    need = f"needs about {_fmt_bytes(needed)}" if needed else "needs more space"
    have = f", {_fmt_bytes(free)} free" if free is not None else ""
    if resume_from:
        after = (f"; the partial write was removed and {resume_from} is complete: free space (or lower "
                 f"training.save_total_limit) and run again with --resume")
    else:
        after = "; the partial write was removed; free space and run again"
    return DiskFullError(f"no space left on device: {what} in {folder} {need}{have}{after}")


def raise_if_disk_full(error: BaseException, folder: str | os.PathLike, what: str, **kwargs: Any) -> None:
    """Raise :func:`disk_full_error`'s error (from ``error``) if the disk is full."""
    full = disk_full_error(error, folder, what, **kwargs)
    if full is not None:
        raise full from error


class AtomicCheckpoints:
    """Mixed into a ``Trainer`` subclass (before ``Trainer``): the compressed model saved with
    ``save_pretrained`` (loadable by :func:`fcot.load_compressed`), checkpoints written atomically
    (staged, manifest last, then renamed), resume reloading the model through the module's
    ``load_compressed``."""

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # transformers 4.x: a Trainer method
            rotate_checkpoints = None
        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING)
        staged = os.path.join(staging, name)
        self._fcot_staging = True
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotation runs after the rename
        try:
            if self.args.should_save and os.path.isdir(staged):
                shutil.rmtree(staged)  # left by a killed run
            self.accelerator.wait_for_everyone()
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                write_manifest(staged, step=self.state.global_step)
        except Exception as e:
            full = disk_full_error(e, run_dir, f"writing {name}", needed=self._fcot_checkpoint_bytes(),
                                   resume_from=_newest_intact(run_dir))
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
                _rmdir_if_empty(staging)
            if full is not None:
                raise full from e
            raise
        finally:
            self._fcot_staging = False
            self.args.save_total_limit = limit
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            _fsync(Path(run_dir))
            _rmdir_if_empty(staging)
            if limit:
                if rotate_checkpoints is not None:
                    rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                                       best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
                else:
                    self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
        self.accelerator.wait_for_everyone()

    def _fcot_checkpoint_bytes(self) -> int:
        """What one checkpoint takes: the last complete one's size, else the model's state plus the optimizer's."""
        last = _newest_intact(self.args.output_dir)
        if last is not None:
            return checkpoint_bytes(last)
        n = sum(t.numel() * t.element_size() for t in self.accelerator.unwrap_model(self.model).state_dict().values())
        for state in getattr(getattr(self, "optimizer", None), "state", {}).values():
            n += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return n

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if getattr(self, "_fcot_staging", False) else out

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model)
        if state_dict is not None:  # FSDP / DeepSpeed: the gathered full state dict of the TrainModule
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        module.save_compressed(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        image_processor = getattr(self, "fcot_image_processor", None)
        if image_processor is not None:
            image_processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        module.load_compressed(resume_from_checkpoint)


def _rmdir_if_empty(folder: str | os.PathLike) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# The run: start, resume, finish
# ---------------------------------------------------------------------------------------------


def _is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate job (from the environment: the process group does not exist yet)."""
    return int(os.environ.get("RANK", "0")) == 0


def check_run(cfg: RunConfig, *, resume: bool) -> str | None:
    """Before anything loads or is written: take the output folder's lock (main process; held
    until :func:`finish_run` or the process ends), refuse a folder that holds another run (unless
    ``--overwrite``), and for ``resume`` clear what an interrupted save left and find the newest
    intact checkpoint (returned)."""
    out = cfg.common.output_dir
    if _is_main_process():
        FolderLock(out, f"common.output_dir={out!r}").acquire()
    check_output_dir(cfg, resume=resume)
    if not resume:
        return None
    main = _is_main_process()
    if main:
        clean_interrupted_writes(out)
    return last_checkpoint(out, move_damaged=main)


def clean_interrupted_writes(output_dir: str | os.PathLike) -> None:
    """Remove what a killed or disk-full save left in a run folder this process holds the lock
    of: ``.staging/`` and the hidden temporary files of the config and metrics writers."""
    out = Path(output_dir)
    leftovers = [out / STAGING, out / Path(METRICS_FILE).with_suffix(".tmp"), *out.glob(".*.tmp-*")]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s (left by an interrupted save)", path)
        elif path.exists():
            path.unlink(missing_ok=True)
            logger.info("removed %s (left by an interrupted save)", path)


def start_run(cfg: RunConfig) -> None:
    """Once the model and the data are ready: clear the output folder on ``--overwrite`` and save
    the config there (main process), so a run that fails to start leaves nothing behind."""
    from accelerate import PartialState

    state = PartialState()
    out = Path(cfg.common.output_dir)
    if state.is_main_process:
        if cfg.common.overwrite and out.exists():
            shutil.rmtree(out)
        save_config(cfg, out)
    state.wait_for_everyone()


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders, newest (highest N) first."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def _newest_intact(output_dir: str | os.PathLike) -> str | None:
    for ckpt in _checkpoints(output_dir):
        if verify_checkpoint(ckpt) is None:
            return str(ckpt)
    return None


def last_checkpoint(output_dir: str, *, move_damaged: bool = True) -> str:
    """The newest checkpoint whose files match its manifest. Newer damaged ones are moved to
    ``output_dir/.damaged/`` (nothing is deleted; ``move_damaged``: the main process only) with a
    warning naming the bad file; with no intact one the error names each bad file and how to
    start over."""
    ckpts = _checkpoints(output_dir) if os.path.isdir(output_dir) else []
    if not ckpts:
        raise CheckpointError(f"--resume: common.output_dir={output_dir!r} holds no checkpoint-N folder to resume "
                              "from; start over with --overwrite (deletes the run) or choose another output_dir")
    bad: list[tuple[Path, str]] = []
    for ckpt in ckpts:
        why = verify_checkpoint(ckpt)
        if why is None:
            for damaged, reason in bad if move_damaged else ():
                dest = Path(output_dir) / DAMAGED / damaged.name
                dest.parent.mkdir(exist_ok=True)
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(damaged, dest)
                logger.warning("--resume: skipped %s: %s; moved it to %s", damaged.name, reason, dest)
            if bad:
                logger.warning("--resume: continuing from %s, the newest intact checkpoint", ckpt)
            return str(ckpt)
        bad.append((ckpt, why))
    details = "; ".join(f"{c.name}: {why}" for c, why in bad)
    raise CheckpointError(f"--resume: no intact checkpoint in {output_dir!r} ({details}). Start over with --overwrite "
                          "(deletes the run), or restore the damaged files from a copy")


DATA_SUMMARY_FILE = "data_summary.json"


def finish_run(trainer, cfg: RunConfig) -> dict[str, Any]:
    """After training: save the final model to ``common.output_dir`` (staged, then each file
    renamed into place, so a full disk leaves the folder as it was), report the skipped records
    (logged, and written to ``data_summary.json`` by the main process) and release the lock;
    returns the counts."""
    out = Path(cfg.common.output_dir)
    staged = out / STAGING / "final"
    main = trainer.args.should_save
    if main and staged.exists():
        shutil.rmtree(staged)
    try:
        trainer.save_model(str(staged))
        trainer.accelerator.wait_for_everyone()
        if main:
            for path in sorted(staged.iterdir()):
                os.replace(path, out / path.name)
    except Exception as e:
        needed = checkpoint_bytes(staged) if staged.exists() else 0
        full = disk_full_error(e, out, "writing the final model",
                               needed=max(needed, sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())),
                               resume_from=_newest_intact(out))
        if main:
            shutil.rmtree(staged, ignore_errors=True)
            _rmdir_if_empty(out / STAGING)
        if full is not None:
            raise full from e
        raise
    if main:
        shutil.rmtree(staged, ignore_errors=True)
        _rmdir_if_empty(out / STAGING)
    summary = trainer.train_dataset.summary()
    (logger.warning if summary.skipped else logger.info)("data: %s", summary)
    counts = summary.as_dict()
    if main:
        path = out / DATA_SUMMARY_FILE
        try:
            path.write_text(json.dumps(counts, indent=1, default=str), encoding="utf-8")
        except OSError as e:
            path.unlink(missing_ok=True)
            raise_if_disk_full(e, out, f"writing {path.name}", needed=4096)
            raise
        lock = run_lock(out)
        if lock is not None:
            lock.release(force=True)
    return counts


__all__ = ["AtomicCheckpoints", "CheckpointError", "DamagedFileError", "check_safetensors_files", "DATA_SUMMARY_FILE", "DiskFullError", "FolderLock", "MANIFEST",
           "METRICS_FILE", "RunLockedError", "STAGING", "check_run", "clean_interrupted_writes", "finish_run",
           "is_disk_full", "last_checkpoint", "metrics_callback_class", "read_metrics", "start_run",
           "verify_checkpoint", "write_manifest"]
