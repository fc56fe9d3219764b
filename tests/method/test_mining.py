"""Mining over a streamed pool in bounded memory (solar.mining): document frequencies by a
counter equal the dense definition; the pool holds embeddings only (bytes counted, nothing
but its share decoded); it is refreshed every R steps; 1 and 2 gloo processes mine the same
negatives; the reader's sample ranges split a pool without overlap."""
import copy
import os
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import solar_kernels as sk
from solar.mining import DocFrequency, EmbeddingPool, PoolSource, key_hash, pool_frequent_token_ids
from solar.stage2 import frequent_token_ids

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

POOL = 150          # pairs in the test pool (of 200 written, 4 shards of 50)


def _dense_frequent(ids, valid, max_df):
    """The definition: a [N, vocab + 1] presence matrix, its float32 column means > max_df."""
    n = ids.shape[0]
    if not 0 < max_df < 1 or n == 0:
        return torch.zeros(0, dtype=torch.long)
    V = int(ids.max()) + 1
    present = torch.zeros(n, V + 1, dtype=torch.bool)
    present.scatter_(1, ids.masked_fill(~valid, V), True)
    return (present[:, :V].float().mean(0) > max_df).nonzero().flatten()


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 70), t=st.integers(1, 12), vocab=st.integers(1, 40), seed=st.integers(0, 2 ** 31),
       num=st.integers(0, 70), den=st.integers(1, 70), chunk=st.integers(1, 80))
@example(n=3, t=4, vocab=2, seed=0, num=1, den=3, chunk=1)       # df exactly at max_df = 1/3
@example(n=49, t=5, vocab=3, seed=1, num=7, den=49, chunk=13)
def test_doc_frequency_counter_equals_the_dense_definition(n, t, vocab, seed, num, den, chunk):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    valid = torch.rand(n, t, generator=g) < 0.7
    max_df = num / den          # fractions k / n put some ids exactly on the threshold
    want = _dense_frequent(ids, valid, max_df)
    assert torch.equal(frequent_token_ids(ids, valid, max_df), want)
    counter = DocFrequency()
    for s in range(0, max(n, 1), chunk):        # any batching gives the same counts
        counter.update(ids[s:s + chunk], valid[s:s + chunk])
    assert counter.documents == n
    assert torch.equal(counter.frequent(max_df), want)


def test_doc_frequency_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="input_ids / valid"):
        DocFrequency().update(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_ids: expected ids >= 0"):
        DocFrequency().update(torch.full((1, 2), -3), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="stage2.mine_pool_size"):
        PoolSource([], None, size=0, image_size=32, patch_size=8, max_length=16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from solar.data.shapesworld import write_shards
    out = tmp_path_factory.mktemp("pool_shards")
    m = write_shards(str(out), 200, seed=3, shard_size=50, image_size=32, progress=False)
    return [os.path.join(str(out), s) for s in m["shards"]]


def _tokenizer():
    from solar.data.tokenizer import load_tokenizer
    return load_tokenizer("shapesworld", model_max_length=40)


def _source(urls, size=POOL, workers=0):
    return PoolSource(urls, _tokenizer(), size=size, image_size=32, patch_size=8, max_length=40, num_workers=workers)


def _model(embed_dim=24):
    from solar.model import ModelConfig, SolarModel
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                      max_text_len=40, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64, width=32,
                      adapter_hidden=64, fusion_layers=1, fusion_heads=2, fusion_mlp=64, embed_dim=embed_dim)
    return SolarModel(cfg.with_tokenizer(tok))


def test_sample_range_splits_a_pool_between_workers_without_decoding_the_rest(shards):
    from solar.data.reader import make_loader
    every = [k for b in make_loader(shards, _tokenizer(), image_size=32, batch_size=64) for k in b["key"]]
    for workers in (0, 2):
        loader = make_loader(shards, _tokenizer(), num_workers=workers, image_size=32, batch_size=16,
                             sample_range=(30, 140))   # crosses two shard boundaries
        keys = [k for b in loader for k in b["key"]]
        assert sorted(keys) == sorted(every[30:140])
        assert loader.stats.totals()["seen"] == 110   # decoded: the range, nothing before or after it
    with pytest.raises(ValueError, match="sample_range"):
        make_loader(shards, _tokenizer(), sample_range=(0, 10), shuffle_buffer=100)


def test_index_reserve_never_regrows():
    index = sk.Index(8, dtype="fp16")
    index.reserve(3000)
    ptr = index._rows.data_ptr()
    for _ in range(30):
        index.add(torch.randn(100, 8))
    assert index._rows.data_ptr() == ptr and index._rows.shape[0] == 3000 and len(index) == 3000
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        index.reserve(-1)


def test_pool_holds_embeddings_only_and_decodes_only_its_share(shards):
    """Bytes of the pool = n x (D x 2 + 8) for fp16 (no pixel bank), its rows equal the model's
    embeddings of the first POOL pairs, and a rank decodes only its share."""
    from solar.data.batches import load_pair_bank
    model = _model().eval()
    pool = EmbeddingPool(_source(shards), dtype="fp16", chunk=64, progress=False)
    pool.refresh(model, step=0)
    D = model.cfg.embed_dim
    assert len(pool) == POOL and pool.decoded == POOL and pool.refreshes == 1
    assert pool.nbytes == POOL * (D * 2 + 8)
    held = [v for v in vars(pool).values() if torch.is_tensor(v)]
    assert sum(v.numel() * v.element_size() for v in held) == POOL * 8     # the key hashes, nothing else
    bank = load_pair_bank(shards, _tokenizer(), image_size=32, patch_size=8, max_length=40, seed=0, limit=POOL,
                          progress=False)
    with torch.no_grad():
        want = torch.cat([model.embed(b) for b in bank.iter_chunks(50)])
    torch.testing.assert_close(pool.index.reconstruct(), want.half().float(), atol=2e-3, rtol=0)
    assert torch.equal(pool.keys, key_hash(bank.fields["key"]))
    assert _source(shards).rank_range(1, 3) == (50, 100)    # rank 1 of 3 (the 2-process test decodes shares)


def test_neighbours_exclude_self_and_match_brute_force(shards):
    model = _model().eval()
    pool = EmbeddingPool(_source(shards), dtype="fp32", exclude_top=1, progress=False)
    pool.refresh(model, step=0)
    bank = pool.index.reconstruct()
    q = bank[[3, 77, 120]]
    nb = pool.neighbours(q, pool.keys[[3, 77, 120]], k=4)
    s = q @ bank.T
    for r, i in enumerate([3, 77, 120]):
        s[r, i] = -float("inf")                          # self
    order = s.argsort(1, descending=True)[:, 1:5]        # exclude_top=1: skip the nearest other
    torch.testing.assert_close(nb, bank[order])
    with pytest.raises(ValueError, match="mine_k"):
        pool.neighbours(q, pool.keys[[3, 77, 120]], k=POOL)


def _mine_on_ranks(di, urls, out):
    torch.set_num_threads(1)
    model = _model().eval()
    pool = EmbeddingPool(_source(urls), dtype="fp16", dist_info=di, progress=False)
    pool.refresh(model, step=0)
    g = torch.Generator().manual_seed(9)
    q = torch.nn.functional.normalize(torch.randn(8, model.cfg.embed_dim, generator=g), dim=-1)
    from solar.data.reader import make_loader
    keys = [k for b in make_loader(urls, _tokenizer(), image_size=32, batch_size=200, rank=0, world_size=1)
            for k in b["key"]][:8]
    per = 8 // di.world
    rows = slice(di.rank * per, (di.rank + 1) * per)
    nb = pool.neighbours(q[rows], key_hash(keys[rows]), k=3)
    return {"mined": nb.tolist(), "sizes": pool.sizes, "decoded": pool.decoded, "nbytes": pool.nbytes}


@pytest.mark.dist
def test_one_and_two_gloo_processes_mine_the_same_negatives(shards, tmp_path):
    from dist_harness import run_ranks

    from solar.distributed import DistInfo
    one = _mine_on_ranks(DistInfo(), shards, None)
    two = run_ranks(_mine_on_ranks, tmp_path, shards, None)
    assert [r["sizes"] for r in two] == [[75, 75], [75, 75]]
    assert [r["decoded"] for r in two] == [75, 75]             # each rank decodes its half only
    D = len(one["mined"][0][0])
    assert [r["nbytes"] for r in two] == [75 * (D * 2 + 8)] * 2
    mined_two = torch.tensor(two[0]["mined"] + two[1]["mined"])
    torch.testing.assert_close(mined_two, torch.tensor(one["mined"]), atol=2e-3, rtol=0)


def test_streamed_frequent_ids_equal_the_in_memory_ones(shards):
    from solar.data.batches import load_pair_bank
    model = _model()
    bank = load_pair_bank(shards, _tokenizer(), image_size=32, patch_size=8, max_length=40, seed=0, limit=POOL,
                          progress=False)
    ids, am = bank.fields["input_ids"], bank.fields["attention_mask"]
    want = frequent_token_ids(ids, model.text_valid_mask(ids, am), 0.3)
    assert len(want) > 0
    got = pool_frequent_token_ids(_source(shards), model.text_valid_mask, 0.3, batch_size=37)
    assert torch.equal(got, want)


def test_streamed_stage2_refreshes_every_r_steps_and_builds_no_pixel_bank(shards, tmp_path, monkeypatch):
    """run_stage2 on streamed shards: the pool is embedded at steps 0, R, 2R, ... (counted), each
    time decoding the pool once; training_data decodes nothing up front."""
    import solar.stage2 as s2
    import solar.data.prepare as prepare
    from solar.config import Stage2Config, TrainConfig
    from solar.data.batches import ShardStreams
    from solar.distributed import DistInfo
    made = []

    class Counted(EmbeddingPool):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.steps = []
            made.append(self)

        def refresh(self, model, step, dist_info=None):
            self.steps.append(step)
            super().refresh(model, step, dist_info)

    monkeypatch.setattr(s2, "EmbeddingPool", Counted)

    def no_bank(*a, **kw):
        raise AssertionError("a pixel bank was decoded")

    monkeypatch.setattr(prepare, "load_pair_bank", no_bank)
    cfg = TrainConfig()
    cfg.data.in_memory = False
    cfg.model.image_size, cfg.model.patch_size, cfg.model.max_text_len = 32, 8, 40
    cfg.stage2.mine_pool_size = 100
    data, pool = prepare.training_data(shards, _tokenizer(), cfg, DistInfo())
    assert isinstance(data, ShardStreams) and isinstance(pool, PoolSource) and len(pool) == 100
    model = _model()
    scfg = Stage2Config(steps=5, batch_size=8, warmup_steps=1, mine_k=2, refresh_every=2, mine_pool_size=100,
                        n_segments=3, kmeans_iters=2, mine_dtype="fp16")
    rows = []
    s2.run_stage2(model, data.phase(8, 2), scfg, out_dir=str(tmp_path / "s2"), seed=1, teacher=copy.deepcopy(model),
                  ckpt_every=0, log_every=1, progress=False, pool=pool,
                  log=lambda m, **_: rows.append(m))
    (p,) = made
    assert p.steps == [0, 2, 4] and p.refreshes == 3 and p.decoded == 3 * 100
    assert all("mined_sim" in r for r in rows) and len(rows) == 5
