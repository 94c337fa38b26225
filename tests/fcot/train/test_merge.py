"""fcot.train.merge: weighted checkpoint averaging, its checks and its atomic write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fcot.train.merge import MergeError, check_weights, merge_checkpoints


def _ckpt(folder: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]] | None = None) -> Path:
    folder.mkdir(parents=True)
    if shards is None:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, keys in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({key: tensors[key] for key in keys}, folder / name, metadata={"format": "pt"})
            weight_map.update({key: name for key in keys})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "internvl", "tag": folder.name}))
    (folder / "optimizer.pt").write_bytes(b"state of one run")
    (folder / "trainer_state.json").write_text("{}")
    return folder


def _model(dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {"proj.weight": torch.randn(7, 5).to(dtype), "proj.bias": torch.randn(7).to(dtype),
            "ln.weight": torch.randn(13).to(dtype), "step": torch.tensor([3], dtype=torch.int64)}


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.0], [0.2, 0.5, 0.3]])
def test_weighted_average(tmp_path, weights):
    models = [_model() for _ in range(3)]
    ckpts = [_ckpt(tmp_path / f"c{k}", m) for k, m in enumerate(models)]
    out = merge_checkpoints(tmp_path / "merged", ckpts, weights)
    merged = _load(out)
    w = torch.tensor(weights or [1.0, 1.0, 1.0], dtype=torch.float64)
    w = w / w.sum()
    for key in ("proj.weight", "proj.bias", "ln.weight"):
        expected = sum(wk * m[key].double() for wk, m in zip(w, models))
        torch.testing.assert_close(merged[key].double(), expected, atol=1e-6, rtol=1e-6)
        assert merged[key].dtype == torch.float32
    assert torch.equal(merged["step"], models[0]["step"])
    # config and other files from the first checkpoint; trainer state is not copied.
    assert json.loads((out / "config.json").read_text())["tag"] == "c0"
    assert not (out / "optimizer.pt").exists() and not (out / "trainer_state.json").exists()
    assert not list(tmp_path.glob(".merged.tmp-*"))


def test_bf16_round_trip_and_fp32_accumulation(tmp_path):
    # Many bf16 checkpoints: the sum is accumulated in fp32 and rounded to bf16 once.
    models = [_model(torch.bfloat16) for _ in range(6)]
    ckpts = [_ckpt(tmp_path / f"c{k}", m) for k, m in enumerate(models)]
    merged = _load(merge_checkpoints(tmp_path / "m", ckpts))
    for key in ("proj.weight", "ln.weight"):
        exact = sum(m[key].double() for m in models) / 6
        assert merged[key].dtype == torch.bfloat16
        # Correctly rounded up to fp32's own error: within half a bf16 ulp (at most 2^-8 relative) of the
        # exact mean, plus fp32's rounding of the sum (2^-20 of the inputs' size; it shows where the mean is ~0).
        scale = max(float(m[key].abs().max()) for m in models)
        err = (merged[key].double() - exact).abs()
        assert bool((err <= exact.abs() * 2.0**-8 + scale * 2.0**-20).all()), err.max()
    # Merging identical checkpoints gives back the same bits.
    same = _load(merge_checkpoints(tmp_path / "same", [ckpts[0], ckpts[0]], [0.3, 0.7]))
    for key, t in models[0].items():
        assert torch.equal(same[key], t)


def test_sharded_layout_kept(tmp_path):
    models = [_model() for _ in range(2)]
    shards = [["proj.weight"], ["proj.bias", "ln.weight", "step"]]
    ckpts = [_ckpt(tmp_path / "a", models[0], shards), _ckpt(tmp_path / "b", models[1])]  # b is single-file
    out = merge_checkpoints(tmp_path / "m", ckpts)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for key, name in index["weight_map"].items():
        with safe_open(out / name, framework="pt") as f:
            assert key in f.keys()
            assert f.metadata() == {"format": "pt"}
    torch.testing.assert_close(_load(out)["proj.weight"], (models[0]["proj.weight"] + models[1]["proj.weight"]) / 2)


def test_mismatches_are_named(tmp_path):
    base = _model()
    a = _ckpt(tmp_path / "a", base)
    missing = _ckpt(tmp_path / "missing", {k: v for k, v in base.items() if k != "ln.weight"})
    with pytest.raises(MergeError, match=r"checkpoint '.*missing' missing 1 key\(s\) of '.*a', e.g. \['ln.weight'\]"):
        merge_checkpoints(tmp_path / "m", [a, missing])
    extra = _ckpt(tmp_path / "extra", {**base, "head.weight": torch.randn(2)})
    with pytest.raises(MergeError, match=r"has 1 key\(s\) '.*a' lacks, e.g. \['head.weight'\]"):
        merge_checkpoints(tmp_path / "m", [a, extra])
    shape = _ckpt(tmp_path / "shape", {**base, "proj.weight": torch.randn(7, 6)})
    with pytest.raises(MergeError, match=r"key 'proj.weight': shape \[7, 6\] in '.*shape' but \[7, 5\] in '.*a'"):
        merge_checkpoints(tmp_path / "m", [a, shape])
    dtype = _ckpt(tmp_path / "dtype", {**base, "ln.weight": base["ln.weight"].half()})
    with pytest.raises(MergeError, match=r"key 'ln.weight': dtype F16 in '.*dtype' but F32 in '.*a'"):
        merge_checkpoints(tmp_path / "m", [a, dtype])
    ints = _ckpt(tmp_path / "ints", {**base, "step": torch.tensor([4])})
    with pytest.raises(MergeError, match=r"key 'step': torch.int64 tensors cannot be averaged and differ"):
        merge_checkpoints(tmp_path / "m", [a, ints])
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_bad_arguments(tmp_path):
    a, b = _ckpt(tmp_path / "a", _model()), _ckpt(tmp_path / "b", _model())
    with pytest.raises(MergeError, match="at least 2 checkpoints"):
        merge_checkpoints(tmp_path / "m", [a])
    with pytest.raises(MergeError, match=r"3 weights for 2 checkpoints"):
        merge_checkpoints(tmp_path / "m", [a, b], [1, 1, 1])
    with pytest.raises(MergeError, match=r"must be finite and >= 0"):
        merge_checkpoints(tmp_path / "m", [a, b], [1, -1])
    with pytest.raises(MergeError, match=r"sum to 0.0"):
        merge_checkpoints(tmp_path / "m", [a, b], [0, 0])
    with pytest.raises(MergeError, match="is one of the input checkpoints"):
        merge_checkpoints(a, [a, b])
    with pytest.raises(MergeError, match="is not a folder"):
        merge_checkpoints(tmp_path / "m", [a, tmp_path / "nope"])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MergeError, match=r"no \*.safetensors file \(it has \['pytorch_model.bin'\]"):
        merge_checkpoints(tmp_path / "m", [a, tmp_path / "bin"])
    assert check_weights([2, 6], 2) == [0.25, 0.75]
    (b / "adapter_config.json").write_text("{}")
    with pytest.raises(MergeError, match=r"'.*b' is a LoRA adapter: .*merge_and_unload"):
        merge_checkpoints(tmp_path / "m", [a, b])


def test_existing_output_needs_overwrite(tmp_path):
    a, b = _ckpt(tmp_path / "a", _model()), _ckpt(tmp_path / "b", _model())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old.txt").write_text("previous run")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_checkpoints(tmp_path / "m", [a, b])
    assert (tmp_path / "m" / "old.txt").exists()
    merge_checkpoints(tmp_path / "m", [a, b], overwrite=True)
    assert not (tmp_path / "m" / "old.txt").exists() and (tmp_path / "m" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "m"]


# ----------------------------------------------------------------------------- faults (issue 21)


def test_huge_weights_normalise_without_overflow(tmp_path):
    """--weights 1e308 1e308 summed to inf and wrote an all-zero model with rc 0."""
    models = [_model() for _ in range(2)]
    ckpts = [_ckpt(tmp_path / f"c{k}", m) for k, m in enumerate(models)]
    assert check_weights([1e308, 1e308], 2) == [0.5, 0.5]
    assert check_weights([1e308, 1e-308], 2) == [1.0, 0.0]  # 1e-616 underflows to 0; the sum stays 1
    merged = _load(merge_checkpoints(tmp_path / "m", ckpts, [1e308, 1e308]))
    expected = (models[0]["proj.weight"].double() + models[1]["proj.weight"].double()) / 2
    torch.testing.assert_close(merged["proj.weight"].double(), expected, atol=1e-6, rtol=1e-6)
    assert merged["proj.weight"].abs().max() > 0


def test_non_finite_results_are_rejected_before_anything_is_written(tmp_path):
    base = _model()
    bad = {**base, "proj.bias": base["proj.bias"].clone()}
    bad["proj.bias"][3] = float("nan")
    a, b = _ckpt(tmp_path / "a", base), _ckpt(tmp_path / "b", bad)
    with pytest.raises(MergeError, match=r"key 'proj.bias': the weighted average has 1 non-finite element\(s\) "
                                         r"\(non-finite values in \['.*b'\]\); nothing was written"):
        merge_checkpoints(tmp_path / "m", [a, b])
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    # the same infinity in every checkpoint (a -inf mask buffer) is kept
    mask = torch.zeros(5)
    mask[2:] = float("-inf")
    c, d = _ckpt(tmp_path / "c", {**base, "mask": mask}), _ckpt(tmp_path / "d", {**_model(), "mask": mask})
    assert torch.equal(_load(merge_checkpoints(tmp_path / "m2", [c, d]))["mask"], mask)
    # fp16's largest value averaged with itself stays finite: no false alarm at the top of the range
    big = {"w": torch.full((4,), 65504.0, dtype=torch.float16)}
    e, f = _ckpt(tmp_path / "e", big), _ckpt(tmp_path / "f", {"w": torch.full((4,), 65504.0, dtype=torch.float16)})
    assert torch.equal(_load(merge_checkpoints(tmp_path / "m3", [e, f]))["w"], big["w"])


def test_a_truncated_input_checkpoint_is_named(tmp_path):
    a, b = _ckpt(tmp_path / "a", _model()), _ckpt(tmp_path / "b", _model())
    shard = b / "model.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 10)
    with pytest.raises(ValueError, match=rf"{shard} is damaged \(\d+ bytes; .*\): it is truncated"):
        merge_checkpoints(tmp_path / "m", [a, b])
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{shard} is damaged \(0 bytes"):
        merge_checkpoints(tmp_path / "m", [a, b])
    assert not (tmp_path / "m").exists()


def test_stale_temporaries_of_dead_merges_are_removed(tmp_path):
    import subprocess
    import sys

    a, b = _ckpt(tmp_path / "a", _model()), _ckpt(tmp_path / "b", _model())
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    for name in (f".m.tmp-{dead}", f".m.old-{dead}", f".m.tmp-{os.getppid()}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    merge_checkpoints(tmp_path / "m", [a, b])
    assert not (tmp_path / f".m.tmp-{dead}").exists() and not (tmp_path / f".m.old-{dead}").exists()
    assert (tmp_path / f".m.tmp-{os.getppid()}").exists()  # a live process: not ours to remove


def test_disk_full_cleans_up_and_says_so(tmp_path, monkeypatch):
    import errno

    import fcot.train.merge as merge

    a, b = _ckpt(tmp_path / "a", _model()), _ckpt(tmp_path / "b", _model())

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge, "save_file", full)
    with pytest.raises(OSError, match=rf"no space left on device: writing the merge m in {tmp_path} needs about \d+"):
        merge_checkpoints(tmp_path / "m", [a, b])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no tmp, no lock, no output


def test_a_merge_into_a_locked_output_is_refused(tmp_path):
    from fcot.train.checkpoint import FolderLock, RunLockedError

    a, b = _ckpt(tmp_path / "a", _model()), _ckpt(tmp_path / "b", _model())
    import subprocess
    import sys

    code = ("import sys, time\nfrom fcot.train.checkpoint import FolderLock\n"
            "FolderLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n")
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "m")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"out='.*m' is in use by another run: pid {proc.pid}"):
            merge_checkpoints(tmp_path / "m", [a, b])
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "m").exists()
    with FolderLock(tmp_path / "m") as lock:
        merge_checkpoints(tmp_path / "m", [a, b], overwrite=True)  # this process's own lock: re-entrant
        assert lock.path.exists()  # still held after the inner release
    assert not lock.path.exists()
