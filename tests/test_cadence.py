"""The loop's cadence on its own: where an epoch's runs of batches are cut (pure arithmetic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trainer.cadence import LOSS_CHECK_RATINGS, Cadence


def _boundaries(cadence: Cadence, epoch: int, start: int, items: list[int]) -> list[int]:
    """Batches done after each cut, feeding items of these many ratings from ``start``."""
    done, seen = start, []
    for ratings in items:
        covered = 0
        for cut, batches in cadence.runs(epoch, done, ratings):
            assert cut.start == covered and batches >= 1
            assert cut.stop - cut.start == batches * cadence.rank_batch
            covered = cut.stop
            done += batches
            seen.append(done)
        assert covered >= ratings > covered - cadence.rank_batch  # the item, whole
    return seen


def _due(cadence: Cadence, epoch: int, done: int) -> bool:
    """Anything due after ``done`` batches, batch by batch: what runs must stop at."""
    return (cadence.check_due(done) or cadence.checkpoint_due(epoch, done)
            or done == cadence.steps
            or cadence.batches_done(epoch, done) + 1 == cadence.fault_batch)


def test_loss_checks_fall_on_row_exchanges() -> None:
    assert Cadence(100, 512).check_every == LOSS_CHECK_RATINGS // 512
    assert Cadence(100, 512, exchange_every=100).check_every == 200
    assert Cadence(100, 512, exchange_every=1024).check_every == 1024  # never between two
    assert Cadence(100, 10**6).check_every == 1  # batches larger than the interval


def test_the_epoch_end_is_checked_but_left_to_the_caller_to_checkpoint() -> None:
    cadence = Cadence(10, 4, exchange_every=3, checkpoint_every=5)
    assert cadence.check_every % 3 == 0 and cadence.check_due(10)
    assert cadence.checkpoint_due(0, 5) and not cadence.checkpoint_due(0, 10)
    assert not cadence.checkpoint_due(0, 4) and not Cadence(10, 4).checkpoint_due(0, 5)


def test_checkpoints_count_batches_over_the_run() -> None:
    cadence = Cadence(7, 4, checkpoint_every=5)
    assert [d for d in range(1, 8) if cadence.checkpoint_due(0, d)] == [5]
    assert [d for d in range(1, 8) if cadence.checkpoint_due(1, d)] == [3]  # batch 10
    assert _boundaries(cadence, 1, 0, [7 * 4]) == [3, 7]


def test_a_run_starts_at_the_fault_batch() -> None:
    cadence = Cadence(20, 4, fault_batch=28)  # epoch 1, batch 8 of 20
    assert _boundaries(cadence, 1, 0, [20 * 4]) == [7, 20]
    assert _boundaries(cadence, 0, 0, [20 * 4]) == [20]


def test_a_short_last_batch_counts_as_a_batch() -> None:
    assert list(Cadence(3, 4).runs(0, 0, 10)) == [(slice(0, 12), 3)]


@given(steps=st.integers(1, 60), rank_batch=st.integers(1, 3000),
       exchange_every=st.integers(1, 8), checkpoint_every=st.integers(0, 12),
       fault_batch=st.integers(0, 200), epoch=st.integers(0, 3), data=st.data())
def test_runs_stop_exactly_where_something_is_due(steps: int, rank_batch: int,
                                                  exchange_every: int, checkpoint_every: int,
                                                  fault_batch: int, epoch: int,
                                                  data: st.DataObject) -> None:
    """Cut where a batch-by-batch loop would act, at item ends, and nowhere else; a resumed
    epoch (``start`` > 0) is cut where the uninterrupted one is."""
    cadence = Cadence(steps, rank_batch, exchange_every, checkpoint_every, fault_batch)
    start = data.draw(st.integers(0, steps - 1))
    sizes = []  # items of 1..9 batches up to the epoch's end, the last batch maybe short
    while sum(sizes) < steps - start:
        sizes.append(min(data.draw(st.integers(1, 9)), steps - start - sum(sizes)))
    items = [n * rank_batch - data.draw(st.integers(0, rank_batch - 1)) for n in sizes]
    ends = {start + sum(sizes[:i + 1]) for i in range(len(sizes))}
    expected = sorted(ends | {d for d in range(start + 1, steps + 1) if _due(cadence, epoch, d)})
    assert _boundaries(cadence, epoch, start, items) == expected
