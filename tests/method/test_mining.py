"""Mining over a streamed pool in bounded memory (solar.mining): document frequencies by a
counter equal the dense definition; the pool holds embeddings only (bytes counted, nothing
but its share decoded); it is refreshed every R steps; 1 and 2 gloo processes mine the same
negatives; the reader's sample ranges split a pool without overlap; each rank's share is
checkpointed and restored, so a resumed stage 2 equals an uninterrupted one."""
import contextlib
import copy
import io
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


# --------------------------------------------------------------------------- exact resume of the mining bank

class _Killed(Exception):
    """Raised from the log callback: the run stops there, as a killed process would (its last
    checkpoint stays on disk; nothing of the process survives into the resumed run)."""


def _stage2_resume_runs(di, urls, out, streamed=True, kill_after=3, corrupt=False):
    """Stage 2 with mining, 5 steps, refreshes at steps 0 and 3, checkpoints at 2, 4, 5: an
    uninterrupted run, and a run killed after step `kill_after` (checkpoint of step 2) then
    resumed in new objects.  Returns, per run, the pool ids mined at each step (the global
    search's ids, in call order), the step it resumed from and a digest of each final weight.
    corrupt: then flip a byte of the last rank's pool share and resume once more ("corrupt": the
    error each rank raised)."""
    import hashlib

    import solar.stage2 as s2
    from solar.config import Stage2Config
    from solar.checkpoint import CheckpointError
    from solar.data.batches import ShardStreams, load_pair_bank
    torch.set_num_threads(1)
    mined: list = []

    class Spy(EmbeddingPool):
        def neighbours(self, f, self_rows, k):
            search, depth = self.index.search, []

            def spy(*a, **kw):   # the sharded search calls search again for its own shard
                depth.append(1)
                scores, ids = search(*a, **kw)
                depth.pop()
                if not depth:
                    mined.append(ids.tolist())
                return scores, ids
            self.index.search = spy
            try:
                return super().neighbours(f, self_rows, k)
            finally:
                del self.index.search

    class MinerSpy(s2.Miner):
        def neighbours(self, f, self_rows, k):
            out = super().neighbours(f, self_rows, k)
            mined.append(self.index.search(f.detach().float().cpu().contiguous(), k + 1)[1].tolist())
            return out

    real = s2.EmbeddingPool, s2.Miner
    s2.EmbeddingPool, s2.Miner = Spy, MinerSpy
    try:
        runs = {}
        plan = [("uninterrupted", None, False), ("killed", kill_after, False), ("resumed", None, True)]
        for name, kill, resume in plan + ([("corrupt", None, True)] if corrupt else []):
            if name == "corrupt":
                from solar.distributed import barrier
                if di.rank == di.world - 1:
                    f = os.path.join(out, "killed", "ckpt", "ranks", str(di.rank), EmbeddingPool.KEYS_FILE)
                    with open(f, "r+b") as fh:
                        fh.seek(-1, 2)
                        b = fh.read(1)
                        fh.seek(-1, 2)
                        fh.write(bytes([b[0] ^ 1]))
                barrier()
            mined.clear()
            tok = _tokenizer()
            model = _model()
            teacher = copy.deepcopy(model)
            if streamed:
                data = ShardStreams(urls, tok, image_size=32, patch_size=8, max_length=40, num_workers=0, seed=0,
                                    rank=di.rank, world=di.world).phase(8, 2)
                pool = _source(urls, size=POOL)
            else:
                data = load_pair_bank(urls, tok, image_size=32, patch_size=8, max_length=40, seed=0, limit=POOL,
                                      progress=False)
                pool = None
            cfg = Stage2Config(steps=5, batch_size=8, warmup_steps=1, mine_k=2, refresh_every=3, mine_pool_size=POOL,
                               n_segments=3, kmeans_iters=2, mine_dtype="fp16", lr=3e-3)
            run_dir = os.path.join(out, "killed" if name in ("resumed", "corrupt") else name)

            def log(row, stage="", step=-1, **_):
                if kill is not None and step == kill:
                    raise _Killed()
            printed = []
            try:
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    s2.run_stage2(model, data, cfg, out_dir=run_dir, resume=resume, seed=1, dist_info=di,
                                  teacher=teacher, ckpt_every=2, log_every=1, progress=False, pool=pool, log=log)
                printed = buf.getvalue().splitlines()
            except _Killed:
                pass
            except CheckpointError as e:
                if name != "corrupt":
                    raise
                runs[name] = str(e)
                continue
            start = next((int(x.split("resumed from step ")[1].split()[0]) for x in printed
                          if "resumed from step" in x), 0)
            runs[name] = {"mined": list(mined), "start": start, "printed": printed, "rank": di.rank,
                          "weights": {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
                                      for k, v in model.state_dict().items()}}
        return runs
    finally:
        s2.EmbeddingPool, s2.Miner = real


def _check_exact_resume(runs):
    ref, resumed = runs["uninterrupted"], runs["resumed"]
    assert len(ref["mined"]) == 5 and len(runs["killed"]["mined"]) == 3
    assert resumed["start"] == 2 or resumed["rank"] > 0, resumed["printed"]   # rank 0 says where it resumed
    assert not any("not restored" in x for x in resumed["printed"]), resumed["printed"]
    # step 2 mines from the bank embedded at step 0 (restored), step 3 refreshes as scheduled
    assert resumed["mined"] == ref["mined"][2:], "mined neighbour ids differ from the uninterrupted run's"
    differ = [k for k in ref["weights"] if resumed["weights"][k] != ref["weights"][k]]
    assert not differ, f"final weights differ from the uninterrupted run's: {differ[:5]}"


def test_resumed_streamed_stage2_restores_the_pool_and_equals_an_uninterrupted_run(shards, tmp_path):
    """Killed between two refreshes (after step 3; refreshes at 0 and 3, last checkpoint at
    step 2), the resumed run restores the pool share of the checkpoint instead of embedding the
    pool with the step-2 weights: it mines the same ids at every step and ends with the same
    weights, bit for bit (one thread)."""
    from solar.distributed import DistInfo
    runs = _stage2_resume_runs(DistInfo(), shards, str(tmp_path))
    _check_exact_resume(runs)
    share = tmp_path / "killed" / "ckpt" / "ranks" / "0"
    D = _model().cfg.embed_dim
    assert sorted(p.name for p in share.iterdir()) == [EmbeddingPool.INDEX_FILE, EmbeddingPool.KEYS_FILE]
    index_bytes = (share / EmbeddingPool.INDEX_FILE).stat().st_size
    keys_bytes = (share / EmbeddingPool.KEYS_FILE).stat().st_size
    # the share as held in memory, N x (D x 2 + 8) bytes, plus two small headers
    assert 0 <= index_bytes - POOL * D * 2 < 256 and 0 <= keys_bytes - POOL * 8 < 512
    assert not (tmp_path / "killed" / "ckpt.ranks.tmp").exists()


def test_resumed_in_memory_stage2_restores_the_bank(shards, tmp_path):
    """The in-memory `Miner` (ShapesWorld's default path) already saved its bank with rank 0's
    checkpoint: the same exact resume holds there."""
    from solar.distributed import DistInfo
    _check_exact_resume(_stage2_resume_runs(DistInfo(), shards, str(tmp_path), False))


@pytest.mark.dist
def test_resumed_streamed_stage2_on_two_gloo_processes(shards, tmp_path):
    """Two ranks: each writes and restores its own share (ranks/0, ranks/1), and the resumed run
    equals the uninterrupted two-process run; a modified share is refused on both ranks."""
    from dist_harness import run_ranks
    ranks = run_ranks(_stage2_resume_runs, tmp_path, shards, str(tmp_path / "runs"), True, 3, True)
    for runs in ranks:
        _check_exact_resume(runs)
    # rank 1's share modified on disk: both ranks refuse the checkpoint (none waits for the other)
    assert "ranks/1/mining_pool.safetensors" in ranks[1]["corrupt"] and "sha256" in ranks[1]["corrupt"]
    assert "another rank" in ranks[0]["corrupt"]
    assert ranks[0]["resumed"]["weights"] == ranks[1]["resumed"]["weights"]
    for r in (0, 1):
        assert (tmp_path / "runs" / "killed" / "ckpt" / "ranks" / str(r) / EmbeddingPool.INDEX_FILE).is_file()


def test_pool_share_round_trip_and_refusals(shards, tmp_path):
    """save_state / load_state give back the same rows, keys, sizes and refresh step; a share
    written for another pool size is refused with the reason (the pool is then re-embedded);
    a modified share file is a CheckpointError when the checkpoint is read."""
    from solar.checkpoint import CheckpointError, rank_state_dir, save_training_state, sha256_file

    model = _model().eval()
    pool = EmbeddingPool(_source(shards, size=60), dtype="fp16", progress=False)
    pool.refresh(model, step=7)
    share = tmp_path / "stage" / "0"
    share.mkdir(parents=True)
    pool.save_state(str(share))
    back = EmbeddingPool(_source(shards, size=60), dtype="fp16", progress=False)
    assert back.load_state(str(share)) is None
    assert torch.equal(back.index.reconstruct(), pool.index.reconstruct())
    assert torch.equal(back.index.reconstruct([5, 2]), pool.index.reconstruct([5, 2]))
    assert torch.equal(back.keys, pool.keys) and back.sizes == [60] and back.refreshed_at == 7
    other = EmbeddingPool(_source(shards, size=61), dtype="fp16", progress=False)
    assert "pool_size 60 -> 61" in other.load_state(str(share))
    assert not other.restore(str(share)) and other.index is None
    assert "no pool share" in other.load_state(str(tmp_path))

    class Tiny(torch.nn.Module):     # what save_model needs of a model
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.cfg = type("Cfg", (), {"to_dict": lambda self: {}})()
    hashes = {"0": {n: sha256_file(share / n) for n in os.listdir(share)}}
    ckpt = tmp_path / "ckpt"
    save_training_state(ckpt, Tiny(), None, {}, rank_dir=tmp_path / "stage", rank_sha256=hashes)
    assert not (tmp_path / "stage").exists()
    assert rank_state_dir(ckpt, 0, 1) == ckpt / "ranks" / "0"
    assert rank_state_dir(ckpt, 0, 2) is None                    # written by one rank, read by two
    with open(ckpt / "ranks" / "0" / EmbeddingPool.KEYS_FILE, "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(CheckpointError, match="sha256"):
        rank_state_dir(ckpt, 0, 1)
