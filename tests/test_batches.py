"""solar.data.batches: the data side of the training loop (batch s is a function of s)."""
import pytest
import torch

from solar.data.batches import PairBank, StreamBatches, float_pixels


def _bank(n=24, seed=3):
    g = torch.Generator().manual_seed(0)
    am = torch.zeros(n, 10, dtype=torch.bool)
    am[:, :6] = True
    am[0, :8] = True          # the longest caption uses 8 columns
    return PairBank({"pixel_values": torch.randn(n, 3, 4, 4, generator=g).half(),
                     "input_ids": torch.randint(0, 50, (n, 10), generator=g), "attention_mask": am,
                     "key": [f"k{i}" for i in range(n)]}, seed=seed)


def test_bank_batches_are_float32_trimmed_and_a_function_of_the_step():
    bank = _bank()
    b = bank.batch(0, 24)
    assert b["pixel_values"].dtype == torch.float32
    assert b["input_ids"].shape[1] == 8 and b["attention_mask"].shape[1] == 8
    assert torch.equal(_bank().batch(5, 8)["bank_index"], bank.batch(5, 8)["bank_index"])
    # rank r's share is its slice of the global batch; an epoch is a permutation
    full = bank.batch(4, 8)["bank_index"]
    parts = torch.cat([bank.batch(4, 8, r, 2)["bank_index"] for r in range(2)])
    assert torch.equal(full, parts)
    epoch = torch.cat([bank.batch(s, 8)["bank_index"] for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(24))
    assert not torch.equal(bank.batch(3, 8)["bank_index"], bank.batch(0, 8)["bank_index"])   # next epoch
    with pytest.raises(ValueError, match="batch_size: global batch 8 is not divisible by the world size 3"):
        bank.batch(0, 8, 0, 3)
    with pytest.raises(ValueError, match="field 'input_ids' has 3 rows, expected 2"):
        PairBank({"a": torch.zeros(2), "input_ids": torch.zeros(3)})


def test_float_pixels_keeps_full_width_when_nothing_is_used():
    b = float_pixels({"attention_mask": torch.zeros(2, 5, dtype=torch.bool), "input_ids": torch.zeros(2, 5)})
    assert b["input_ids"].shape == (2, 5)


def test_stream_batches_resume_reads_the_same_batches_and_counts_the_skipped_ones():
    """A fresh StreamBatches asked for step s (a resumed run) returns the s-th batch of the
    stream; without a seekable reader it reads and drops the s batches before it (counted)."""
    made = []

    def make():
        made.append(1)
        return [{"i": i} for i in range(5)]          # 5 batches, re-iterated when exhausted
    run = StreamBatches(make)
    ref = [run.batch(s)["i"] for s in range(12)]
    assert ref == [s % 5 for s in range(12)] and run.skipped == 0
    resumed = StreamBatches(make)
    assert [resumed.batch(s)["i"] for s in range(7, 12)] == ref[7:]
    assert resumed.skipped == 7
    with pytest.raises(ValueError, match="yielded no batches"):
        StreamBatches(lambda: []).batch(0)
