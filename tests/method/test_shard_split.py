"""Shard splitting for any number of shards, ranks and DataLoader workers (solar.data.reader):
every sample is read by exactly one reader per epoch, and no reader loops forever when there
are fewer shards than readers (it used to: a worker without a shard spun through empty epochs
under repeat=True, and the DataLoader waited on it for ever)."""
import itertools

import pytest

PER_SHARD = 6


@pytest.fixture(scope="module")
def make_shards(tmp_path_factory):
    from solar.data.shapesworld import write_shards
    made = {}

    def make(n):
        if n not in made:
            out = tmp_path_factory.mktemp(f"split{n}")
            man = write_shards(str(out), n * PER_SHARD, seed=n, shard_size=PER_SHARD, workers=1, image_size=32,
                               progress=False)
            made[n] = [str(out / s) for s in man["shards"]]
        return made[n]
    return make


@pytest.fixture(scope="module")
def tok():
    from solar.data.tokenizer import shapesworld_tokenizer
    return shapesworld_tokenizer(40)


@pytest.mark.parametrize("shards,ranks,workers", [(1, 2, 2), (1, 1, 3), (2, 2, 2), (3, 2, 2), (5, 2, 2),
                                                  (4, 2, 1), (6, 1, 4), (7, 3, 2)])
@pytest.mark.parametrize("epoch", [0, 1])
def test_every_sample_is_read_once_per_epoch_by_one_reader(make_shards, tok, shards, ranks, workers, epoch):
    """Over all ranks and worker roles, one epoch reads each sample exactly once, and every
    reader has something to read (fewer shards than readers: the shard's samples are split)."""
    from solar.data.reader import PairDataset
    urls = make_shards(shards)
    seen, per_reader = [], []
    for rank in range(ranks):
        ds = PairDataset(urls, tok, image_size=32, patch_size=8, batch_size=1, rank=rank, world_size=ranks,
                         shard_shuffle=True, shuffle_buffer=4, seed=3, ground_truth="none")
        for role in range(workers):
            keys = [k for b in ds._one_epoch(epoch, role, workers) for k in b["key"]]
            per_reader.append(len(keys))
            seen += keys
    assert len(seen) == len(set(seen)) == shards * PER_SHARD
    assert min(per_reader) > 0


def _loader(url, tok, *, rank, batch_size, workers=2):
    """A DataLoader over one rank's PairDataset (1 shard, 2 ranks, `workers` workers,
    repeat=True) that raises instead of waiting more than 120 s for a batch: a worker
    spinning through empty epochs makes it time out."""
    import torch
    from solar.data.reader import PairDataset
    ds = PairDataset([url], tok, image_size=32, patch_size=8, batch_size=batch_size, drop_last=True, repeat=True,
                     rank=rank, world_size=2, shard_shuffle=True, seed=0)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, timeout=120)


def test_one_shard_two_ranks_two_workers_never_hangs(make_shards, tok):
    """1 shard, 2 ranks x 2 DataLoader workers, repeat=True: each rank's loader keeps giving
    batches from both of its workers, and the 4 readers together read every sample."""
    url = make_shards(1)[0]
    keys = set()
    for rank in range(2):
        got = [b["key"][0] for b in itertools.islice(_loader(url, tok, rank=rank, batch_size=1), 6)]
        assert len(got) == 6
        keys |= set(got)
    assert len(keys) == PER_SHARD


def test_readers_without_a_full_batch_stop_instead_of_looping(make_shards, tok):
    """A reader whose whole epoch cannot fill one batch stops (with a warning) instead of
    reading empty epochs for ever; when every reader of a rank stops, its training stream
    raises instead of hanging."""
    from solar.data.batches import StreamBatches
    url = make_shards(1)[0]
    # 6 samples over 4 readers (2, 2, 1, 1 each), batches of 2: rank 0's first reader fills one
    # batch per epoch, its second never does and stops; the loader goes on with the first
    got = list(itertools.islice(_loader(url, tok, rank=0, batch_size=2), 4))
    assert len(got) == 4
    # batches of 3: no reader of rank 1 ever fills one
    with pytest.raises(ValueError, match="the training loader yielded no batches"):
        StreamBatches(lambda: _loader(url, tok, rank=1, batch_size=3)).batch(0)
