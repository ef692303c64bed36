"""When, within an epoch, the loop stops training to do something else.

A loader item holds a run of consecutive batches (trainer/data.py) and the step takes a
run whole; the loop cuts a run only where something must happen between two batches: a
finite-loss check (a collective every rank joins), a mid-epoch checkpoint, the epoch's
end, or (tests only) an injected fault. `Cadence` is that arithmetic and nothing else.
Every rank builds it from the same facts, so all ranks meet at the same collectives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

# Ratings a rank trains between finite-loss checks, at least. Each check is a collective
# all ranks wait at (and syncs a GPU), so under the periodic row sync checks fall on the
# steps that exchange rows, where ranks have just met: between them, two CPU ranks spent
# 7 % of an epoch waiting for each other at the checks.
LOSS_CHECK_RATINGS = 131_072


@dataclass(frozen=True)
class Cadence:
    """Where one rank's epoch is cut, in batches (steps) of ``rank_batch`` ratings.

    ``steps_done`` below counts the batches done in the epoch in progress; checkpoints and
    the fault count batches over the whole run (``epoch * steps + steps_done``), so a
    resumed run keeps the interval of the one it continues.
    """

    steps: int  # batches per epoch, the same on every rank
    rank_batch: int  # ratings per batch on this rank
    exchange_every: int = 1  # batches between the step's row exchanges (1: every batch)
    checkpoint_every: int = 0  # batches between mid-epoch checkpoints (0: none)
    fault_batch: int = 0  # tests only: the run's batch (1-based) a fault precedes (0: none)

    @property
    def check_every(self) -> int:
        """Batches between finite-loss checks: a multiple of the exchange interval."""
        exchanges = max(1, LOSS_CHECK_RATINGS // (self.rank_batch * self.exchange_every))
        return self.exchange_every * exchanges

    def batches_done(self, epoch: int, steps_done: int) -> int:
        """Batches done since the run began (epochs are 0-based)."""
        return epoch * self.steps + steps_done

    def batches_to_next_event(self, epoch: int, steps_done: int) -> int:
        """Batches to take from ``steps_done`` before anything else is due (at least 1)."""
        done = self.batches_done(epoch, steps_done)
        stops = [self.check_every - steps_done % self.check_every, self.steps - steps_done]
        if self.checkpoint_every:
            stops.append(self.checkpoint_every - done % self.checkpoint_every)
        if self.fault_batch - 1 > done:  # stop just before the fault's batch
            stops.append(self.fault_batch - 1 - done)
        return max(1, min(stops))

    def runs(self, epoch: int, steps_done: int, ratings: int
             ) -> Iterator[tuple[slice, int]]:
        """Cut a loader item of ``ratings`` ratings (its last batch may be short) where
        events fall; yields each piece's slice of the item and its number of batches."""
        batches = -(-ratings // self.rank_batch)
        taken = 0
        while taken < batches:
            take = min(batches - taken, self.batches_to_next_event(epoch, steps_done + taken))
            yield slice(taken * self.rank_batch, (taken + take) * self.rank_batch), take
            taken += take

    def check_due(self, steps_done: int) -> bool:
        """Check the loss now: on every check interval, and at the epoch's end."""
        return steps_done % self.check_every == 0 or steps_done == self.steps

    def checkpoint_due(self, epoch: int, steps_done: int) -> bool:
        """Save a checkpoint now (the epoch's end is saved after validation instead)."""
        return (self.checkpoint_every > 0 and steps_done < self.steps
                and self.batches_done(epoch, steps_done) % self.checkpoint_every == 0)
