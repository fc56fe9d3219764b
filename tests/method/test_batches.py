"""solar.data.batches: the data side of the training loop (batch s is a function of s; a
streamed batch s continues from a recorded reader position without decoding batches before it)."""
import json

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


def test_stream_batches_without_a_seekable_loader_replay_and_count_the_skipped_ones():
    """A fresh StreamBatches over a loader that cannot seek (`make_loader()`), asked for step s
    (a resumed run), returns the s-th batch of the stream by reading and dropping the s batches
    before it (counted in `skipped`)."""
    made = []

    def make():
        made.append(1)
        return [{"i": i} for i in range(5)]          # 5 batches, re-iterated when exhausted
    run = StreamBatches(make)
    ref = [run.batch(s)["i"] for s in range(12)]
    assert ref == [s % 5 for s in range(12)] and run.skipped == 0
    resumed = StreamBatches(make)
    resumed.load_state_dict(run.state_dict())       # no reader position: nothing to seek to
    assert [resumed.batch(s)["i"] for s in range(7, 12)] == ref[7:]
    assert resumed.skipped == 7
    with pytest.raises(ValueError, match="yielded no batches"):
        StreamBatches(lambda: []).batch(0)


# ---------------------------------------------------------------- seekable shard streams

SHARDS, PER_SHARD, B = 3, 16, 4


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory):
    from solar.data.shapesworld import write_shards
    out = tmp_path_factory.mktemp("streams")
    man = write_shards(str(out), SHARDS * PER_SHARD, seed=2, shard_size=PER_SHARD, workers=1, image_size=32,
                       progress=False)
    return [str(out / n) for n in man["shards"]]


@pytest.fixture(scope="module")
def tok():
    from solar.data.tokenizer import shapesworld_tokenizer
    return shapesworld_tokenizer(40)


def _counting_stream(urls, tok, workers):
    """A ShardStreams phase whose loaders are kept, to read their decode counts."""
    from solar.data.batches import ShardStreams
    streams = ShardStreams(urls, tok, image_size=32, patch_size=8, max_length=40, num_workers=workers, seed=1)
    made = []

    def make(start):
        made.append(streams.make(B, 1, start))
        return made[-1]
    return StreamBatches(make, seekable=True, num_workers=workers), made


@pytest.mark.parametrize("workers,resume_at", [(0, 5), (0, 15), (2, 9)])
def test_seekable_stream_resumes_without_decoding_consumed_batches(shard_urls, tok, workers, resume_at):
    """Resumed from its state after `resume_at` batches (mid-shard, or in the second epoch),
    the stream gives exactly the uninterrupted stream's batches (keys, pixels with their random
    crops, tokens) and decodes none of the consumed ones: the reader's decode count covers only
    the batches read after the resume (plus what DataLoader workers prefetch)."""
    steps = resume_at + 4
    ref, made = _counting_stream(shard_urls, tok, workers)
    want, state = [], None
    for s in range(steps):
        want.append(ref.batch(s))
        if s + 1 == resume_at:
            state = json.loads(json.dumps(ref.state_dict()))     # what a checkpoint keeps
    assert state["step"] == resume_at and state["stream"]["workers"] == max(1, workers)
    resumed, rmade = _counting_stream(shard_urls, tok, workers)
    resumed.load_state_dict(state)
    for s in range(resume_at, steps):
        b = resumed.batch(s)
        for k in ("key", "pixel_values", "input_ids", "attention_mask", "gt_patch_mask"):
            assert (b[k] == want[s][k]) if k == "key" else torch.equal(b[k], want[s][k]), (s, k)
    assert resumed.skipped == 0 and len(rmade) == 1
    decoded = rmade[0].stats.totals()["seen"]
    prefetch = 2 * workers       # DataLoader's default prefetch_factor per worker
    assert decoded <= (steps - resume_at + prefetch) * B, decoded
    assert decoded < resume_at * B       # the consumed batches were not decoded again
    if workers == 0:
        assert decoded == (steps - resume_at) * B
        assert made[0].stats.totals()["seen"] == steps * B


def test_a_stream_state_needs_the_same_number_of_workers(shard_urls, tok):
    """A position recorded with 2 reader workers cannot place 1: the stream replays from its
    start instead (same batches, the consumed ones read again and counted)."""
    ref, _ = _counting_stream(shard_urls, tok, 2)
    want = [ref.batch(s)["key"] for s in range(6)]
    one, _ = _counting_stream(shard_urls, tok, 0)
    one.load_state_dict(ref.state_dict())
    one.batch(5)
    assert one.skipped == 5
    from solar.data.reader import PairDataset
    ds = PairDataset(shard_urls, tok, image_size=32, patch_size=8, batch_size=B, start=ref.state_dict()["stream"])
    with pytest.raises(ValueError, match="start: a position of a stream with 2 reader worker"):
        next(iter(ds))
    with pytest.raises(ValueError, match="start: expected a dict"):
        PairDataset(shard_urls, tok, start={"roles": []})
    assert len(want) == 6
