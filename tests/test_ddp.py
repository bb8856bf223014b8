"""Training under torchrun: two CPU processes (gloo) train exactly what one process trains."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from ichscan.train.distributed import RankBatches, Ranks, ranks_from_env, share
from ichscan.train.sampler import BalancedSampler


def test_rank_shares_of_each_step_make_up_the_single_process_batch():
    targets = torch.zeros((23, 6))
    targets[::3, 0] = targets[::3, 5] = 1
    sampler = BalancedSampler(targets.numpy(), seed=4)
    sampler.set_epoch(2)
    single = list(RankBatches(sampler, 7))
    assert single == [list(sampler)[i : i + 7] for i in range(0, 23, 7)]  # plain batching
    for world in (2, 3, 5):
        per_rank = [list(RankBatches(sampler, 7, Ranks(rank, world))) for rank in range(world)]
        assert {len(steps) for steps in per_rank} == {len(single)} == {4}  # every rank, every step
        for step, batch in enumerate(single):
            assert [i for steps in per_rank for i in steps[step]] == batch
    # A short last step of 2 draws over 3 ranks: the last rank has nothing (it still steps).
    assert [share([5, 6], Ranks(rank, 3)) for rank in range(3)] == [[5], [6], []]


def test_ranks_from_torchrun_environment():
    assert not ranks_from_env({}).enabled
    ranks = ranks_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (ranks.rank, ranks.world, ranks.local_rank, ranks.local_world, ranks.main) == (3, 4, 1, 2, False)


@pytest.fixture(scope="module")
def rsna_small(make_phantoms):
    return make_phantoms("rsna-ddp", studies=10, slices=6, seed=21, layout="rsna", size=64)[0]


def _train(args, data, run, *extra, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*args, "train", str(data), "--labels", str(data / "stage_2_train.csv"), "--out", str(run), "--workers", "0", "--no-progress", "--no-augment", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _history(run):
    with open(run / "history.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_torchrun_two_processes_train_what_one_trains_and_resume(rsna_small, tmp_path):
    """Two gloo processes, global batch 47 over 48 training images: a step of 24 + 23 and a
    step where rank 1 has no image. Same seed, same draws, same loss: the same weights as
    one process (to float rounding); rank 0 alone writes and logs; --resume goes on."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ichscan"]
    single, double = tmp_path / "single", tmp_path / "double"
    _train([sys.executable, "-m", "ichscan"], rsna_small, single, "--epochs", "1", "--batch-size", "47")
    log = _train(torchrun, rsna_small, double, "--epochs", "1", "--batch-size", "47")
    assert "distributed training: 2 processes (gloo)" in log
    assert log.count("epoch 1/1:") == 1  # rank 1 logs no progress
    a = torch.load(single / "best.pt", weights_only=True)["state_dict"]
    b = torch.load(double / "best.pt", weights_only=True)["state_dict"]
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    assert abs(float(_history(single)[0]["val_loss"]) - float(_history(double)[0]["val_loss"])) < 1e-4
    assert (single / "split.csv").read_text() == (double / "split.csv").read_text()
    _train(torchrun, rsna_small, double, "--epochs", "2", "--batch-size", "47", "--resume")
    assert [row["epoch"] for row in _history(double)] == ["1", "2"]
