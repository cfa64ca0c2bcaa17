"""The processes a training run spans: rank, size and the few collectives data parallelism needs.

A `World` hides how processes talk: one process (`LocalWorld`, the default), W threads in one
process (`ThreadWorld`, the test double that drives the real distributed loop in every test run)
or W MPI processes (`MPIWorld`, through mpi4py, as `mpiexec -n W charrnn run ...` starts them).
The training loop asks the world to sum gradients and to share decisions, so every decision
(stop, best, NaN, patience) is made once and every side effect happens on rank 0.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, Protocol, TypeVar, runtime_checkable

import numpy as np

from charrnn.errors import CharrnnError, ConfigError

T = TypeVar("T")

#: environment variables by which launchers tell a process how many processes the job has
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")
#: ... and how many of them share this node
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")

MODES = ("auto", "off", "mpi")


class WorldAborted(BaseException):
    """Raised on the ranks of a `ThreadWorld` when another rank aborted or failed.

    A BaseException, so that code catching `Exception` around a collective does not swallow it.
    """

    def __init__(self, code: int) -> None:
        super().__init__(f"another rank aborted with status {code}")
        self.code = code


@runtime_checkable
class World(Protocol):
    """Rank `rank` of `size` processes and the collectives the training loop calls.

    Every rank must call each collective in the same order. `allreduce` sums into `buf` in place
    (rank order fixed, so all ranks get the same bits); `broadcast` returns root's object on every
    rank; `gather` returns the objects of all ranks, in rank order, on root and None elsewhere;
    `abort` ends the whole job with `code`.
    """

    rank: int
    size: int

    def allreduce(self, buf: np.ndarray) -> np.ndarray: ...

    def broadcast(self, obj: T, root: int = 0) -> T: ...

    def gather(self, obj: T, root: int = 0) -> list[T] | None: ...

    def abort(self, code: int) -> NoReturn: ...


class LocalWorld:
    """One process: every collective is the identity."""

    rank, size = 0, 1

    def allreduce(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def broadcast(self, obj: T, root: int = 0) -> T:
        return obj

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        return [obj]

    def abort(self, code: int) -> NoReturn:
        raise SystemExit(code)


class _Shared:
    """What the threads of one `ThreadWorld` exchange through."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list[Any] = [None] * size
        self.aborted: int | None = None


class ThreadWorld:
    """Rank `rank` of `size` threads in one process: the distributed loop without MPI.

    Collectives meet at a barrier; `allreduce` sums the ranks' buffers in rank order, as a
    two-process MPI sum does. `run(size, fn)` starts the threads.
    """

    def __init__(self, shared: _Shared, rank: int) -> None:
        self._shared, self.rank, self.size = shared, rank, shared.size

    def _wait(self) -> None:
        try:
            self._shared.barrier.wait()
        except threading.BrokenBarrierError:
            raise WorldAborted(self._shared.aborted or 1) from None

    def _exchange(self, obj: Any) -> list[Any]:
        shared = self._shared
        shared.slots[self.rank] = obj
        self._wait()
        everyone = list(shared.slots)
        self._wait()  # nobody writes the next round's slot before all have read this one
        return everyone

    def allreduce(self, buf: np.ndarray) -> np.ndarray:
        parts = self._exchange(buf.copy())
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        buf[...] = total
        return buf

    def broadcast(self, obj: T, root: int = 0) -> T:
        return self._exchange(obj)[root]

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        everyone = self._exchange(obj)
        return everyone if self.rank == root else None

    def abort(self, code: int) -> NoReturn:
        self._shared.aborted = code
        self._shared.barrier.abort()
        raise WorldAborted(code)

    @staticmethod
    def run(size: int, fn: Callable[[ThreadWorld], T]) -> list[T]:
        """`fn(world)` on `size` threads; the results in rank order, or the first rank's error."""
        shared = _Shared(size)
        results: list[Any] = [None] * size
        errors: list[BaseException | None] = [None] * size

        def target(rank: int) -> None:
            try:
                results[rank] = fn(ThreadWorld(shared, rank))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors[rank] = exc
                if shared.aborted is None:
                    shared.aborted = getattr(exc, "code", 1) if isinstance(exc, WorldAborted) else 1
                shared.barrier.abort()  # the other ranks stop waiting for this one

        threads = [threading.Thread(target=target, args=(r,), name=f"rank-{r}") for r in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next((e for e in errors if e is not None and not isinstance(e, WorldAborted)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results


class MPIWorld:
    """Rank `comm.rank` of an MPI job, through mpi4py's buffer and object collectives."""

    def __init__(self, comm: Any) -> None:
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        from mpi4py import MPI

        self._in_place, self._sum = MPI.IN_PLACE, MPI.SUM

    def allreduce(self, buf: np.ndarray) -> np.ndarray:
        self.comm.Allreduce(self._in_place, buf, op=self._sum)
        return buf

    def broadcast(self, obj: T, root: int = 0) -> T:
        return self.comm.bcast(obj, root=root)

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        return self.comm.gather(obj, root=root)

    def abort(self, code: int) -> NoReturn:
        self.comm.Abort(code)
        raise SystemExit(code)  # not reached: Abort ends the process


def launcher_size(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """How many processes a launcher (mpiexec, srun) says the job has; 1 when none started us."""
    for name in LAUNCHER_SIZE_VARS:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def local_size(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """How many of the job's processes share this node (1 when unknown)."""
    for name in LOCAL_SIZE_VARS:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def detect(mode: str | bool = "auto", environ: dict[str, str] | os._Environ[str] = os.environ) -> World:
    """The world `train.distributed` asks for: `off` (or false), `mpi`, or `auto`.

    `auto` is MPI only when a launcher started this process with more than one process, so
    mpi4py (whose import costs about a second with some MPIs) is imported only then.
    """
    if mode is False or mode == "off":
        return LocalWorld()
    if mode not in MODES:
        raise ConfigError(f"train.distributed: expected auto, off or mpi, got {mode!r}")
    expected = launcher_size(environ)
    if mode == "auto" and expected <= 1:
        return LocalWorld()
    if mode == "mpi" and expected <= 1 and not any(v in environ for v in LAUNCHER_SIZE_VARS):
        raise ConfigError(
            "train.distributed is mpi but no MPI launcher started this process; "
            "run it as `mpiexec -n W charrnn run PIPELINE.yaml`"
        )
    try:
        from mpi4py import MPI
    except ImportError:
        raise CharrnnError(
            "distributed training needs mpi4py: pip install 'charrnn[mpi]' "
            "(or mpi4py built against your cluster's MPI)"
        ) from None
    world = MPIWorld(MPI.COMM_WORLD)
    if world.size != expected:
        raise CharrnnError(
            f"the launcher started {expected} processes but MPI reports a world of {world.size}: "
            "mpiexec and mpi4py come from different MPI libraries (use the mpiexec of the MPI that "
            "mpi4py was built with, e.g. the one `pip install 'charrnn[mpi]'` puts beside python)"
        )
    return world


def rows(world: World, batch_size: int) -> slice:
    """The stream rows rank `world.rank` owns of a global batch of `batch_size` streams."""
    if batch_size % world.size:
        raise ConfigError(
            f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world.size})"
        )
    per = batch_size // world.size
    return slice(world.rank * per, (world.rank + 1) * per)


def agree(world: World, what: str, value: Any, describe: Callable[[Any], str] = repr) -> None:
    """Check that every rank has the same `value`; if not, the same one-line error on every rank."""
    if world.size == 1:
        return
    values = world.broadcast(world.gather(value))
    for rank, other in enumerate(values):
        if other != values[0]:
            raise CharrnnError(
                f"rank {rank} differs from rank 0 in {what}: {describe(other)} there, {describe(values[0])} "
                "on rank 0 (every process must see the same pipeline and corpus)"
            )


class SharedFailure(CharrnnError):
    """Set-up failed on some rank; every rank raises this, and only rank 0 prints it.

    `code` is the exit status every rank leaves with: 2 for a user's error, 1 for a bug.
    """

    def __init__(self, message: str, code: int, rank: int) -> None:
        super().__init__(message)
        self.code, self.rank = code, rank


@contextmanager
def together(world: World) -> Iterator[None]:
    """Run a set-up block on every rank; if it fails on any, it fails on all, with its message.

    Every rank gets to the exchange at the end of the block, failed or not, so a corpus
    missing on one node ends the job with that node's message instead of leaving the other
    ranks waiting in a collective.
    """
    if world.size == 1:
        yield
        return
    failure: tuple[str, int] | None = None
    try:
        yield
    except CharrnnError as exc:
        failure = (str(exc), getattr(exc, "code", 2))
    except Exception as exc:  # a bug on this rank: the others must still hear of it
        failure = (f"{type(exc).__name__}: {exc}", 1)
    failures = world.broadcast(world.gather(failure))
    found = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if not found:
        return
    messages = {message for _, (message, _) in found}
    if len(messages) == 1 and len(found) == world.size:
        message = found[0][1][0]  # every rank failed alike: a problem of the pipeline, said once
    else:
        message = "; ".join(f"rank {rank}: {message}" for rank, (message, _) in found)
    raise SharedFailure(message, max(code for _, (_, code) in found), world.rank)
