"""Two CPU processes (gloo, torchrun): both end with the same model, rank 0 alone writes the files."""

import json
import os
import subprocess
import sys

import pytest
import torch

from train_fixtures import tiny_data

from mrkd.benchmarks.mosquitto import free_port

pytestmark = pytest.mark.slow

# Each rank saves the weights it holds in memory; the test compares them.
WORKER = """
import sys, warnings
warnings.simplefilter("ignore")
import torch
import torch.distributed as dist
from mrkd.train.trainer import TrainConfig, train
data, out = sys.argv[1], sys.argv[2]
config = TrainConfig(epochs=2, batch_size=4, image_size=64, eval_every=1, seed=1, progress=False, device="cpu")
summary = train(data, "grain", out, config, backbone="resnet18", teacher_weights="random", resume=False)
model = summary["model"]
torch.save({"world_size": summary["world_size"], "loss": [r["loss"] for r in summary["history"]],
            "bottleneck": model.bottleneck.state_dict(), "student": model.student.state_dict()},
           f"{out}/rank{dist.get_rank()}.pt")
"""


def test_two_gloo_processes_train_one_model(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(tiny_data()), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["loss"] == ranks[1]["loss"]              # the loss is averaged over both processes
    saved = torch.load(out / "last.ckpt", weights_only=True)
    for part in ("bottleneck", "student"):
        for name, tensor in ranks[0][part].items():
            assert torch.equal(tensor, ranks[1][part][name]), f"ranks differ in {part}.{name}"
            assert torch.equal(tensor, saved[part][name]), f"last.ckpt differs from rank 0 in {part}.{name}"
    # Rank 0 alone wrote the history (two epochs, each evaluated on the test split).
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and all("image_auroc" in row for row in rows)
    assert saved["train_state"]["epoch"] == 2 and len(saved["train_state"]["rng"]) == 2
    assert not list(out.glob(".*.tmp"))
