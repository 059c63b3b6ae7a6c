"""Several processes: torchrun's environment, rank 0 as the one writer, and two CPU processes matching one.

Two CPU processes (gloo) are started twice: with ``torch.multiprocessing`` and torchrun's
environment variables, to get each rank's masks, records and collectives back and compare
them with one process; and with torchrun itself, for a run whose rank 0 fails.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from compress import distributed, pipeline, recipe
from compress import run as run_cli
from compress.errors import InputError

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "quickstart.toml"
# the quick-start shrunk: still pretraining, two prune rounds with retraining, k-means with fine-tuning
FAST = ["--set", "pretrain.epochs=6", "--set", "stages.prune.rounds=2", "--set", "stages.prune.retrain.epochs=1",
        "--set", "stages.quantize.finetune.epochs=1", "--set", "run.threads=1"]
# Two processes differ from one only in the float summation order of the averaged gradients.
CENTROID_TOLERANCE = 1e-5
ACCURACY_TOLERANCE = 0.5  # points


# --- one process: the environment and the devices -------------------------------------------------------

def test_env_ranks_without_torchrun_is_one_process():
    assert distributed.env_ranks({}) == (0, 1, 0)


def test_env_ranks_reads_torchrun_variables():
    assert distributed.env_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert distributed.env_ranks({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2, 1)  # LOCAL_RANK defaults to RANK


@pytest.mark.parametrize("env, expect", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one': expected an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "need 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "need 0 <= RANK < WORLD_SIZE"),
])
def test_env_ranks_bad_values_are_input_errors(env, expect):
    with pytest.raises(InputError, match=expect):
        distributed.env_ranks(env)


def test_pick_device_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.pick_device("auto") == torch.device("cpu")
    assert distributed.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="run.device: \"cuda\" asked for but no CUDA device"):
        distributed.pick_device("cuda")


def test_pick_device_auto_is_the_local_gpu_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.pick_device("auto") == torch.device("cuda", 0)
    assert distributed.pick_device("auto", local_rank=1, local_world=2) == torch.device("cuda", 1)
    assert distributed.pick_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(InputError, match="3 processes on this machine but it has 2 CUDA device"):
        distributed.pick_device("cuda", local_rank=0, local_world=3)


def test_one_process_helpers_call_straight_through():
    model = nn.Linear(2, 2)
    masks = {"weight": torch.ones(2, 2, dtype=torch.bool)}
    assert not distributed.active()
    assert distributed.on_main(lambda: 5) == 5
    assert distributed.broadcast_masks(masks) is masks
    assert distributed.all_sum([1.0, 2.0]) == [1.0, 2.0]
    assert distributed.wrap(model, torch.device("cpu")) is model
    with distributed.started("cpu") as proc:
        assert (proc.rank, proc.world_size, proc.is_main, proc.owns_group) == (0, 1, True, False)


# --- two processes ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun --standalone sets for each process it starts."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def collectives(rank: int, world: int) -> dict:
    """Rank 0's failure, sums, mask broadcasts and quantization-aware training, in a started process group."""
    out = {}

    def fail():
        raise InputError("disk full")

    try:
        distributed.on_main(fail)
    except distributed.PeerError as e:
        out["failure"] = ("peer", str(e), e.exit_code)
    except InputError as e:
        out["failure"] = ("own", str(e), 2)
    out["sum"] = distributed.all_sum([rank + 1.0, 1.0])
    out["mask"] = distributed.broadcast_masks({"w": torch.full((3,), bool(rank))})["w"].tolist()
    out["qat"] = quantization_aware_training(rank, world).numpy()
    return out


def cli_process(rank: int, world: int, port: int, argv: list[str], queue) -> None:
    """One process of a run: torchrun's environment, a few collectives, then ``python -m compress.run``'s main.

    The process group is started here first, so the run uses it as one started by its caller
    (``distributed.setup``); the torchrun test below covers the run starting it. Puts back its
    exit code, what it printed, the masks and records it ended with, and the collectives' results.
    """
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)
    results = []
    real_run = pipeline.run
    pipeline.run = lambda *a, **k: results.append(real_run(*a, **k)) or results[-1]
    out, err = io.StringIO(), io.StringIO()
    with distributed.started("cpu") as proc:
        checks = {"process": (proc.rank, proc.world_size, proc.owns_group), **collectives(rank, world)}
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_cli.main(argv)
        checks["group_kept"] = torch.distributed.is_initialized()  # the run left the caller's group alone
    checks["group_left"] = torch.distributed.is_initialized()
    state = results[0].state if results else None
    queue.put((rank, {
        "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), **checks,
        "masks": {n: m.numpy().copy() for n, m in state.masks.items()} if state else {},
        "records": {n: (r.positions, r.codes, r.table.values) for n, r in state.records.items()} if state else {},
        "accuracy": results[0].report.get("final_accuracy") if results else None,
    }))


def run_processes(world: int, argv: list[str], timeout: float = 240) -> list[dict]:
    """Start ``world`` processes of ``compress.run`` and return what each put back, in rank order."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=cli_process, args=(r, world, port, argv, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # a hang is a failure, not a stuck test suite
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return [got[r] for r in range(world)]


def quantization_aware_training(rank: int = 0, world: int = 1) -> torch.Tensor:
    """Two epochs of quantization-aware training (straight-through estimator, masks held) of a tiny net."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from compress import masks as masks_mod, quant, train
    from compress.stages.linear import FakeQuantized
    from compress.train import Optimizer, TrainConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 16, generator=g)  # 90 samples, batches of 32: a short last batch (26) split 13/13
    data = SimpleNamespace(train=TensorDataset(x, (x[:, :4].sum(1) > 0).long()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 2))
    keep = model[0].weight.abs() > 0.05
    grid = quant.grid(model[0].weight.detach(), keep, bits=3)
    with masks_mod.parametrized(model, {"0.weight": FakeQuantized(grid, keep), "2.weight": masks_mod.Masked(
            torch.ones_like(model[2].weight, dtype=torch.bool))}):
        train.fit(model, data, TrainConfig(epochs=2, lr=0.01, optimizer=Optimizer.ADAM, weight_decay=0.0),
                  device=torch.device("cpu"), seed=3, batch_size=32, desc="qat", rank=rank, world_size=world)
    return model[0].weight.detach().clone()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same recipe in this one process (no torchrun environment)."""
    out = tmp_path_factory.mktemp("one") / "run"
    overrides = [v for k, v in zip(FAST[::2], FAST[1::2])]
    result = pipeline.run(recipe.load(RECIPE, overrides), out=out)
    return out, result


def test_two_processes_match_one_and_agree_exactly(tmp_path, one_process):
    one_dir, one = one_process
    out = tmp_path / "two"
    ranks = run_processes(2, [str(RECIPE), "--out", str(out), *FAST])

    # only rank 0 speaks and writes
    assert [r["code"] for r in ranks] == [0, 0]
    assert ranks[0]["stdout"].startswith(f"done: {out}/report.md") and ranks[0]["stdout"].count("\n") == 1
    assert ranks[1]["stdout"] == "" and ranks[1]["stderr"] == ""
    assert json.loads((out / "versions.json").read_text())["processes"] == 2
    assert not list(out.glob("**/*.tmp")) and not list(out.glob("**/.*.tmp"))

    # every rank ends with the same masks, codes and centroids, bit for bit
    for name, mask in ranks[0]["masks"].items():
        assert np.array_equal(mask, ranks[1]["masks"][name]), name
    for name, (positions, codes, centroids) in ranks[0]["records"].items():
        other = ranks[1]["records"][name]
        assert np.array_equal(positions, other[0]) and np.array_equal(codes, other[1])
        assert np.array_equal(centroids, other[2]), name

    # the collectives: rank 0 raises its own error, rank 1 learns of it (exit code 2: bad input) instead of waiting
    assert [r["process"] for r in ranks] == [(0, 2, True), (1, 2, True)]
    assert [r["group_kept"] for r in ranks] == [True, True] and [r["group_left"] for r in ranks] == [False, False]
    assert ranks[0]["failure"] == ("own", "disk full", 2)
    assert ranks[1]["failure"] == ("peer", "InputError: disk full", 2)
    assert ranks[0]["sum"] == ranks[1]["sum"] == [3.0, 2.0]
    assert ranks[0]["mask"] == ranks[1]["mask"] == [False, False, False]  # rank 0's
    # quantization-aware training under DDP: both ranks hold the same weights, those of one process
    assert np.array_equal(ranks[0]["qat"], ranks[1]["qat"])
    assert np.abs(ranks[0]["qat"] - quantization_aware_training().numpy()).max() <= 1e-6

    # and the same masks and codes as one process with the same global batch; centroids and accuracy close
    assert set(ranks[0]["masks"]) == set(one.state.masks)
    for name, mask in one.state.masks.items():
        assert np.array_equal(ranks[0]["masks"][name], mask.numpy()), name
    for name, record in one.state.records.items():
        positions, codes, centroids = ranks[0]["records"][name]
        assert np.array_equal(positions, record.positions) and np.array_equal(codes, record.codes), name
        assert np.abs(centroids - record.table.values).max() <= CENTROID_TOLERANCE, name
    assert abs(ranks[0]["accuracy"] - one.report["final_accuracy"]) <= ACCURACY_TOLERANCE
    # the written files agree too: sizes within a few bytes (centroids differ in their last bits only)
    assert abs((out / "model.dcz").stat().st_size - (one_dir / "model.dcz").stat().st_size) <= 64


def test_torchrun_failure_on_rank0_stops_the_run_with_one_line(tmp_path):
    # rank 0 cannot create the run folder: one line from it, nothing from rank 1, no traceback of ours
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "compress.run", str(RECIPE), "--out", str(blocker / "run"), *FAST],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stdout == ""
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "output folder" in ours[0] and str(blocker / "run") in ours[0]
    assert "[rank 1]" not in done.stderr and f'File "{ROOT / "compress"}' not in done.stderr
    # torchrun's own summary follows, with rank 0's exit code 2 (bad input). Rank 1 exits with 2 too
    # (PeerError), and the ranks race: whichever exits first, torchrun SIGTERMs the other (-15) if it is
    # still winding down, and either may be "first observed". Rank 0 has printed its line by then.
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*\n\s*exitcode\s*: (2|-15)\b", done.stderr)
    assert re.search(r"exitcode\s*: 2\b", done.stderr)  # one rank at least ended on the bad input
