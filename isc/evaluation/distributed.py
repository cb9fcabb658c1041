"""Extraction by a group of processes: each computes its share of the shards, then one searches.

The shard cache is the only thing the processes share (:func:`isc.evaluation.extract.extract_share`):
rank ``r`` of ``w`` computes shards ``r, r + w, ...`` of every listing a run will extract, the group
waits, and rank 0 runs the task as one process would, reading every shard back. A killed group resumes
from every rank's finished shards; a rank that fails ends every rank with its error.

The group is started by the caller (Lightning Fabric in ``tasks/``, or ``torchrun`` / SLURM through it);
this module only uses ``torch.distributed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["GroupFailed", "Ranks"]

log = logging.getLogger(__name__)


class GroupFailed(RuntimeError):
    """A process of the group failed; raised on every process, naming each failure."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: ``rank`` of ``world`` (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The initialised ``torch.distributed`` group's, else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def sync(self, error: BaseException | None = None) -> None:
        """Wait for every process, each with its outcome; raise :class:`GroupFailed` on every process
        when any failed (a process that died instead makes ``torch.distributed`` raise here)."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        outcomes: list[str | None] = [None] * self.world
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(outcomes, mine)
        failed = [(r, e) for r, e in enumerate(outcomes) if e is not None]
        if failed:
            raise GroupFailed(
                "; ".join(f"rank {r} of {self.world} failed: {e}" for r, e in failed)
            ) from error

    def share(self, work: Callable[[], None]) -> None:
        """This process's share of the work, then :meth:`sync`: an error on one process ends them all."""
        try:
            work()
        except GroupFailed:
            raise  # already known to every process
        except Exception as e:
            log.error("rank %d of %d failed: %s", self.rank, self.world, e)
            self.sync(e)
        else:
            self.sync()
