"""The OOM fallback's choices (runner/train/oom.py) on the real estimate, and the data position carried across
a change of micro-batch size or world size (runner/data.py)."""

from __future__ import annotations

import torch

from runner.data import MicroBatches
from runner.loading import load_job
from runner.train.oom import asked_gib, candidates, is_oom, next_config


def _tiny(*sets):
    return load_job("jobs/tiny-cpu.yaml", list(sets))


def test_the_ladder_recomputes_more_then_halves_the_micro_batch_at_the_same_global_batch():
    spec = _tiny()
    ladder = candidates(spec, 4)
    assert [s.activation_checkpointing.count for _, s in ladder] == [3, 4, 4]
    last = ladder[-1][1].training
    assert (last.micro_batch_size, last.gradient_accumulation_steps) == (2, 4)  # 4 x 2 before: global 8 kept
    assert candidates(_tiny("training.micro_batch_size=1", "activation_checkpointing.layers=all",
                            "activation_checkpointing.count=null"), 4) == []


def test_next_config_lowers_the_estimate_by_what_the_failed_allocation_asked():
    from runner.estimate.trace import estimate

    spec = _tiny()
    before = estimate(spec).peak_gib
    small = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 KiB. GPU 0 has ...")
    what, chosen = next_config(spec, small)
    assert is_oom(small) and asked_gib(small) == 1 / 1024**2
    assert estimate(chosen).peak_gib <= 0.95 * before and "was 2" in what
    huge = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB.")
    what, chosen = next_config(spec, huge)  # nothing gets that low: the least memory there is
    assert chosen.training.micro_batch_size == 2 and "micro-batch 2 x accumulation 4" in what
    assert not is_oom(RuntimeError("worker died"))


def test_a_resumed_position_covers_the_same_rows_at_another_layout():
    rows = [{"input_ids": [i], "labels": [i]} for i in range(40)]

    def taken(batches, n):
        seen = []
        for _ in range(n):
            seen += batches.next()["input_ids"].flatten().tolist()
        return seen

    before = MicroBatches(rows, 4, 0, seed=1)
    done = taken(before, 13)  # 3 in the second epoch (10 per epoch)
    after = MicroBatches(rows, 2, 0, seed=1)
    after.position = after.position_from(before.position, 4, 1)
    assert after.position == 26
    rest_before, rest_after = taken(before, 7), taken(after, 14)
    assert sorted(rest_before) == sorted(rest_after)  # the rest of the epoch: the same rows
    assert not set(rest_after) & set(done[40:])
    pair = [MicroBatches(rows, 2, 0, seed=1, rank=r, world_size=2) for r in range(2)]
    for b in pair:
        b.position = b.position_from(13, 4, 1)  # one worker of micro-batch 4 -> two of micro-batch 2
    assert sorted(taken(pair[0], 7) + taken(pair[1], 7)) == sorted(rest_before)
