"""Several processes, one run: torchrun's environment, DistributedDataParallel, rank 0 as the one writer.

Launched as ``torchrun --standalone --nproc-per-node=N -m compress.run RECIPE.toml``,
every process runs the whole pipeline on its own copy of the model:

- ``started`` reads torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, puts the
  process on ``cuda:LOCAL_RANK`` with the ``nccl`` backend when CUDA is used, else on
  the CPU with ``gloo``, and destroys the process group when the run ends, however it ends.
- Training steps go through ``wrap`` (DistributedDataParallel: one gradient all-reduce
  per step); each process takes its share of every global batch (``data.batch_plan``),
  so N processes train on the batches one process would.
- Discrete decisions (masks, codes, codebooks) are computed by every process from the
  same weights, then rank 0's are broadcast (``broadcast_masks``, ``broadcast_records``,
  ``share_run_state``): they are identical on every rank by construction.
- Files are written by rank 0 alone, through ``on_main``: the others wait for its
  result, and if it fails they stop too (``PeerError``) instead of hanging.

In a single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every helper here is a
no-op or calls straight through, so the one-process path is unchanged.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from compress.errors import CompressError, InputError
from compress.record import TensorRecord

if TYPE_CHECKING:
    from compress.stages.base import State

T = TypeVar("T")

# Rank 0 alone writes checkpoints and encodes, decodes and evaluates the model file while the
# others wait in a collective; NCCL's default of 10 minutes is too short for that on a large model.
TIMEOUT = datetime.timedelta(hours=2)
DEVICES = ("auto", "cpu", "cuda")


class PeerError(Exception):
    """Raised on the other ranks when rank 0 failed in work only it does; rank 0 reports the error.

    Args:
        message: rank 0's error, one line.
        exit_code: the exit code rank 0 gives it (2 for bad input, 1 otherwise).
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Process:
    """Where this process stands in the run.

    Attributes:
        rank: its index among ``world_size`` processes; rank 0 writes files and logs.
        world_size: the number of processes.
        local_rank: its index on this machine (its GPU).
        device: where it trains.
        owns_group: whether ``started`` created the process group (and so destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` when not launched by it.

    Raises:
        InputError: a variable that is not a number, or ranks that do not fit ``WORLD_SIZE``.
    """
    env = os.environ if environ is None else environ
    values = {}
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
        raw = env.get(key)
        if raw is None or raw.strip() == "":
            values[key] = default
            continue
        try:
            values[key] = int(raw)
        except ValueError:
            raise InputError(f"environment variable {key}={raw!r}: expected an integer (set by torchrun)") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    local = rank if values["LOCAL_RANK"] is None else values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InputError(f"environment RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need "
                         f"0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 (launch with torchrun)")
    return rank, world, local


def pick_device(device: str, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """The device for ``run.device``: ``auto`` is CUDA when present (``cuda:local_rank``), else the CPU.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        local_rank: this process's index on its machine.
        local_world: processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``); checked
            against the GPUs present, so every process reports the same error.

    Raises:
        InputError: ``cuda`` without a CUDA device, or more processes on a machine than it has GPUs.
    """
    device = getattr(device, "value", device)
    if device not in DEVICES:
        raise InputError(f"run.device: unknown device {device!r}; allowed: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("run.device: \"cuda\" asked for but no CUDA device is available; use \"auto\" or \"cpu\"")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if max(local_rank + 1, local_world) > count:
        raise InputError(f"{max(local_rank + 1, local_world)} processes on this machine but it has {count} CUDA "
                         f"device(s); start at most {count} per node (torchrun --nproc-per-node) or set "
                         f"run.device = \"cpu\"")
    return torch.device("cuda", local_rank)


def setup(device: str) -> Process:
    """Join the run: read the ranks, pick the device, start the process group if there are several processes.

    A process group started by the caller beforehand is used as it is (and left to the caller).

    Raises:
        InputError: bad environment, device or rendezvous (e.g. ``MASTER_ADDR`` unset).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = env_ranks()[2] if "LOCAL_RANK" in os.environ else rank
        return Process(rank, world, local, placed(pick_device(device, local)), owns_group=False)
    rank, world, local = env_ranks()
    where = placed(pick_device(device, local, local_world_size()))
    if world == 1:
        return Process(device=where)
    backend = "nccl" if where.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    except (ValueError, RuntimeError) as e:
        text = str(e).strip().splitlines()
        raise InputError(f"torch.distributed ({backend}): cannot start the process group of {world} "
                         f"({text[0] if text else type(e).__name__}); launch with torchrun") from None
    return Process(rank, world, local, where, owns_group=True)


def local_world_size() -> int:
    """torchrun's ``LOCAL_WORLD_SIZE`` (processes on this machine); 1 when unset or unreadable."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(raw) if raw.strip().isdigit() else 1


def placed(device: torch.device) -> torch.device:
    """Make ``device`` this process's current CUDA device (collectives and ``.cuda()`` go there)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def shutdown(proc: Process) -> None:
    """Destroy the process group if ``setup`` created it."""
    if proc.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def started(device: str) -> Iterator[Process]:
    """``setup`` for the duration of a block, then ``shutdown``, also when the block raises."""
    proc = setup(device)
    try:
        yield proc
    finally:
        shutdown(proc)


# --- who am I ---------------------------------------------------------------------------------------

def active() -> bool:
    """Whether this process is one of several in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def comm_device() -> torch.device:
    """Where tensors must be for a collective: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- rank 0 decides, writes, reports ----------------------------------------------------------------

def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result, or raises when it failed.

    Rank 0 re-raises its own exception; the others raise ``PeerError`` with its message, so
    a failed write stops every process at once instead of leaving them waiting.
    The result must be picklable (it is broadcast).
    """
    if not active():
        return fn()
    outcome, error = None, None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn())
        except Exception as e:  # noqa: BLE001 -- every failure must reach the other ranks
            error = e
            outcome = ("error", f"{type(e).__name__}: {e}", 2 if isinstance(e, CompressError) else 1)
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        if error is not None:
            raise error
        raise PeerError(outcome[1], outcome[2])
    return outcome[1]


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled: small objects only, between our own processes)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=comm_device())
    return box[0]


def broadcast_tensors_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor in place with rank 0's; shapes and dtypes must already agree."""
    if not active():
        return
    comm = comm_device()
    for t in tensors:
        if t.device == comm and t.dtype is not torch.bool and t.is_contiguous():
            dist.broadcast(t, src=0)
            continue
        buf = t.to(comm, dtype=torch.uint8 if t.dtype is torch.bool else t.dtype).contiguous()
        dist.broadcast(buf, src=0)
        t.copy_(buf)


def broadcast_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's masks (name -> bool tensor) on every rank, whatever the others held before."""
    if not active():
        return masks
    shapes = broadcast_object({name: tuple(m.shape) for name, m in masks.items()})
    out = {}
    for name, shape in shapes.items():
        mine = masks.get(name)
        m = mine.detach().cpu().bool().clone() if mine is not None and tuple(mine.shape) == shape \
            else torch.zeros(shape, dtype=torch.bool)
        broadcast_tensors_([m])
        out[name] = m
    return out


def broadcast_records(records: dict[str, TensorRecord]) -> dict[str, TensorRecord]:
    """Rank 0's records (positions, codes, table) on every rank."""
    if not active():
        return records
    heads = broadcast_object({name: (r.shape, int(r.positions.size), r.table) for name, r in records.items()})
    out = {}
    for name, (shape, size, table) in heads.items():
        mine = records.get(name)
        if mine is not None and mine.positions.size == size:
            positions, codes = torch.from_numpy(mine.positions.copy()), torch.from_numpy(mine.codes.copy())
        else:
            positions, codes = torch.empty(size, dtype=torch.int64), torch.empty(size, dtype=torch.int64)
        broadcast_tensors_([positions, codes])
        out[name] = TensorRecord(shape, positions.numpy(), codes.numpy(), table)
    return out


def share_run_state(model: nn.Module, state: "State") -> None:
    """Make every rank hold rank 0's weights, masks, records and model file after a stage.

    Called after every stage (computed or resumed from a checkpoint only rank 0 read):
    whatever a stage did on the other ranks, from here on they all hold rank 0's result.
    """
    if not active():
        return
    head = broadcast_object({"folded_bn": state.folded_bn, "file": state.file})
    if head["folded_bn"] and not state.folded_bn:  # rank 0 resumed a checkpoint of folded weights
        from compress.fold import fold_batchnorm

        fold_batchnorm(model)
    state.folded_bn, state.file = head["folded_bn"], head["file"]
    share_model(model)
    state.masks = broadcast_masks(state.masks)
    state.records = broadcast_records(state.records)


def share_model(model: nn.Module) -> None:
    """Rank 0's parameters and buffers in every rank's ``model`` (same architecture on every rank)."""
    if active():
        broadcast_tensors_(model.state_dict().values())


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, after training updated each locally."""
    if active():
        broadcast_tensors_([b for b in model.buffers()])


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks (float64: exact for counts below 2**53)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


# --- training -----------------------------------------------------------------------------------------

def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module a training loop calls: ``model`` itself in one process, a DDP wrapper around it in several.

    DDP syncs rank 0's parameters and buffers when it is built and averages gradients
    at every ``backward``. It does not broadcast buffers every step
    (``broadcast_buffers=False``): the masks and codes held as buffers are identical
    already, and sending them each step would cost more than the gradients; BatchNorm
    statistics are synced once after training (``sync_buffers``). Every parameter that
    requires grad must receive one; freeze the rest (e.g. the original weight behind a
    k-means parametrization) before wrapping.
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.14 names it forward_sync_buffers (buffers are still synced once at init, as wanted)
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **no_buffer_sync)
