"""Distributed ``saicl-eval``: the ranks of a ``torchrun`` / ``accelerate launch`` job, a deterministic split of the
work units, and one exchange point per phase where every rank learns every other rank's result or error.

Launched by ``torchrun --nproc_per_node N -m saicl.eval.evaluate ...``, every rank builds the same list of work
units (:func:`saicl.eval.eval_tasks.work_units`), runs its share (:func:`split_units`) and all ranks exchange
their raw results; rank 0 alone writes the files. The backend is ``nccl`` for CUDA devices (one GPU per rank,
``cuda`` means ``cuda:LOCAL_RANK``), ``gloo`` on CPU. Nothing here is node-specific: the launcher's rendezvous
(``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``, ...) is all it reads.

No rank is left waiting on an error: :meth:`World.run_everywhere` catches a phase's exception, every rank
takes part in the exchange anyway, and then every rank stops (the failing one with its own error, the others
with :class:`RankFailedError` naming it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from saicl.config_cli import cli_message

from .eval_tasks import WorkUnit

T = TypeVar("T")


class RankFailedError(Exception):
    """Another rank failed in the same phase: this rank stops too. ``exit_code`` is the failing rank's (2: bad
    input, 1: anything else)."""

    def __init__(self, rank: int, message: str, exit_code: int):
        self.rank, self.message, self.exit_code = rank, message, exit_code
        super().__init__(f"stopped because rank {rank} failed: {message}")


def exit_code_of(err: BaseException) -> int:
    """The exit code ``saicl-eval`` gives ``err`` (the same rule as :func:`saicl.eval.cli.run_cli`)."""
    from saicl.attention.base import BackendUnavailableError

    if isinstance(err, (ValueError, FileNotFoundError, BackendUnavailableError)):
        return 2
    return 1


@dataclass
class World:
    """This process's place in the job: ``rank`` of ``size`` (``size == 1``: one process, no process group)."""

    rank: int = 0
    size: int = 1
    owns_group: bool = False  # this object initialised the process group and destroys it in close()

    @classmethod
    def from_env(cls, device: str) -> tuple[World, str]:
        """The world the launcher describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and this rank's device.

        With more than one rank the default process group is initialised (if the launcher's code has not
        already): ``nccl`` for CUDA, where ``device="cuda"`` becomes ``cuda:LOCAL_RANK``; ``gloo`` otherwise.
        """
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls(), device
        import torch
        import torch.distributed as dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "gloo"
        if torch.device(device).type == "cuda":
            if torch.device(device).index is None:
                device = f"cuda:{local_rank}"
            torch.cuda.set_device(torch.device(device))  # object collectives on nccl use the current device
            backend = "nccl"
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend)
        return cls(rank=rank, size=size, owns_group=owns), device

    def run_everywhere(self, phase: Callable[[], T]) -> list[T]:
        """Run ``phase`` on this rank and return every rank's value (picklable), in rank order.

        If ``phase`` raised on any rank, every rank raises once all have finished the phase: the failing
        rank its own exception, the others :class:`RankFailedError` naming the lowest failing rank.
        """
        return self._exchange(phase, share=True)

    def guard(self, phase: Callable[[], T]) -> T:
        """Run ``phase`` on this rank and return its value (not sent anywhere); errors as :meth:`run_everywhere`."""
        return self._exchange(phase, share=False)[0]

    def _exchange(self, phase: Callable[[], T], share: bool) -> list:
        if self.size == 1:
            return [phase()]
        import torch.distributed as dist

        error: BaseException | None = None
        value = None
        try:
            value = phase()
        except Exception as err:  # reported to every rank below, then re-raised: no rank waits forever
            error = err
        failure = None
        if error is not None:
            code = exit_code_of(error)
            failure = (cli_message(error) if code == 2 else f"{type(error).__name__}: {error}", code)
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, (value if share else None, failure))
        if error is not None:
            raise error
        failures = [(rank, failed) for rank, (_, failed) in enumerate(gathered) if failed is not None]
        if failures:
            rank, (message, code) = failures[0]
            raise RankFailedError(rank, message, code)
        return [v for v, _ in gathered] if share else [value]

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def split_units(units: Sequence[WorkUnit], size: int) -> list[list[WorkUnit]]:
    """A deterministic, balanced split of ``units`` over ``size`` ranks: every unit exactly once.

    Largest cost first, each to the rank with the least work so far (lowest rank on ties); each rank's share
    is returned in canonical order, so a rank switches structure as rarely as one process does.
    """
    shares: list[list[WorkUnit]] = [[] for _ in range(size)]
    load = [0] * size
    for unit in sorted(units, key=lambda u: (-u.cost, u.index)):
        rank = min(range(size), key=lambda r: (load[r], r))
        shares[rank].append(unit)
        load[rank] += unit.cost
    return [sorted(share, key=lambda u: u.index) for share in shares]


__all__ = ["RankFailedError", "World", "exit_code_of", "split_units"]
