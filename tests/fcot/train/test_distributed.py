"""FSDP on CPUs (fcot.train.distributed): ``torchrun --nproc_per_node=2 ... fcot distill/posttrain
--set training.fsdp=full_shard`` with gloo really shards (every parameter a DTensor, where
accelerate alone would fall back to DDP), its first losses equal a single-process run with the
same global batch, and the saved model is a full state dict that loads with fcot.load_compressed
and equals the single-process model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import fcot  # noqa: E402
from fcot.cli import main  # noqa: E402
from tests.fcot.train.conftest import synth_jsonl  # noqa: E402
from fcot.train.checkpoint import read_metrics  # noqa: E402
from fcot.train.config import ConfigError, build_config  # noqa: E402
from fcot.train.trainer import build_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]

# Runs fcot's CLI under torchrun and records, per rank, whether every parameter of the trained
# module is a DTensor (FSDP2's sharded parameter), after training.
WRAPPER = """
import json, sys
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import fcot.train.trainer as T

train = T.FcotTrainer.train
def recording_train(self, *a, **k):
    out = train(self, *a, **k)
    params = list(self.model.parameters())
    sharded = sum(isinstance(p, DTensor) for p in params)
    path = sys.argv[1] + f"/rank{dist.get_rank()}.json"
    open(path, "w").write(json.dumps({"sharded": sharded, "params": len(params), "world": dist.get_world_size()}))
    return out
T.FcotTrainer.train = recording_train
from fcot.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return synth_jsonl(tmp_path_factory, n=8, seed=1, size=128, font_size=18)


def _argv(stage, data, out, batch, *extra):
    return [stage, "--model", "tiny", "--output-dir", str(out), "--set", f"data.jsonl={data}", "--set", "data.max_tiles=1",
            *[f"--set=training.{kv}" for kv in ("max_steps=2", "use_cpu=true", "disable_tqdm=true", "save_strategy=no",
                                                 "learning_rate=1e-3", "max_grad_norm=0", "lr_scheduler_type=constant",
                                                 f"per_device_train_batch_size={batch}")], *extra]


def _losses(out):
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


@pytest.mark.slow  # two torchrun launches of 2 processes each (about 25 s per stage on 2 cores)
@pytest.mark.parametrize("stage", ["distill", "posttrain"])
def test_torchrun_fsdp_full_shard_on_cpu_shards_and_matches_one_process(data, tmp_path, stage):
    single = tmp_path / "single"
    assert main(_argv(stage, data, single, 4)) == 0  # global batch 4 in one process

    sharded = tmp_path / "fsdp"
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={port}", str(tmp_path / "wrapper.py"), str(tmp_path),
         *_argv(stage, data, sharded, 2, "--set", "training.fsdp=full_shard", "--set", "training.ddp_backend=gloo")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["world"] == 2 and seen["params"] > 50 and seen["sharded"] == seen["params"], seen
    # Same global batch (2 ranks x 2 = 4): the same losses, step after step.
    torch.testing.assert_close(torch.tensor(_losses(sharded)), torch.tensor(_losses(single)), rtol=1e-4, atol=1e-6)
    # The saved model is a full state dict: it loads and equals the one-process model. Adam moves
    # an element by up to lr per step whatever its gradient's size, so an element whose gradient is
    # rounding noise (the two runs sum in another order) may differ by up to lr * steps; all the
    # others agree to fp32 rounding.
    got, want = fcot.load_compressed(sharded).state_dict(), fcot.load_compressed(single).state_dict()
    assert got.keys() == want.keys()
    lr, steps = 1e-3, 2
    for key in want:
        diff = (got[key].float() - want[key].float()).abs()
        assert diff.max() <= lr * steps, (key, diff.max())
        loose = (diff > 1e-6 + 1e-4 * want[key].float().abs()).float().mean().item()
        assert loose <= 1e-4, (key, loose)


def test_fsdp_on_cpu_without_a_distributed_launch_is_refused(data, tmp_path):
    cfg = build_config("distill", {"common": {"model": "tiny", "output_dir": str(tmp_path / "o")},
                                   "data": {"jsonl": [data], "max_tiles": 1},
                                   "training": {"use_cpu": True, "fsdp": "full_shard"}})
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine accelerate shards; fcot's CPU path is not taken")
    with pytest.raises(ConfigError, match=r"training.fsdp: FSDP shards over processes; launch with torchrun"):
        build_trainer(cfg)
    cfg.training["fsdp"] = "shard_grad_op"
    with pytest.raises(ConfigError, match=r"training.fsdp='shard_grad_op': on a CPU fcot shards with FSDP2 full_shard"):
        build_trainer(cfg)
    assert not (tmp_path / "o").exists()
