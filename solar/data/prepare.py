"""What a training run reads, prepared from its config: training shards, benchmarks, batches.

`solar.train` calls these in order and keeps only the phases:

1. `training_urls`: the training shards (--data.train_shards, checked to exist), or ShapesWorld
   generated into the cache folder when no shards are given;
2. `prepare_benchmark` / `prepare_val_benchmark`: the test and validation benchmark folders,
   built in the cache when absent (a folder the user named is never replaced);
3. `training_data`: the pairs in memory (`PairBank`) or streamed (`ShardStreams`), plus the
   stage-2 mining pool (streamed: a `solar.mining.PoolSource`, decoded by stage 2 only); `phase_data` gives each phase its batches.

Under torchrun rank 0 writes what is missing and every rank waits at a barrier, so all ranks
read the same files.  Folder names in the cache carry the settings that fix their content
(seed, sizes, image size), so changing a setting builds new data instead of reusing stale data.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from .. import benchmark as bm
from ..config import TrainConfig
from ..distributed import DistInfo, barrier
from ..mining import PoolSource
from ..towers import image_stats
from .batches import PairBank, ShardStreams, load_pair_bank
from .reader import expand_urls
from .shapesworld import BENCHMARK_ITEM_BASE, write_shards

__all__ = ["VAL_ITEM_BASE_OFFSET", "shapesworld_dir", "bench_dir", "val_bench_dir", "training_urls",
           "prepare_benchmark", "prepare_val_benchmark", "prepare_data", "load_bank", "training_data",
           "phase_data", "describe_data"]

# validation benchmark item ids start here: above every test-benchmark id the default builder
# uses (BENCHMARK_ITEM_BASE + 2 * triplets + pool) and below nothing training may use
VAL_ITEM_BASE_OFFSET = 500_000_000

_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://")


def shapesworld_dir(cfg: TrainConfig) -> str:
    """The cache folder of the generated ShapesWorld training shards for cfg's data settings."""
    d = cfg.data
    return os.path.join(d.cache_dir, f"shapesworld-s{d.seed}-n{d.train_pairs}-i{cfg.model.image_size}")


def bench_dir(cfg: TrainConfig) -> str:
    """The test benchmark folder: --data.bench_dir, or its cache folder for cfg's settings."""
    d = cfg.data
    if d.bench_dir:
        return d.bench_dir
    return os.path.join(d.cache_dir, f"bench-s{d.bench_seed}-t{d.bench_triplets}-p{d.bench_pool}-i{cfg.model.image_size}")


def val_bench_dir(cfg: TrainConfig) -> str:
    """The validation benchmark folder: --data.val_bench_dir, or its cache folder."""
    d = cfg.data
    if d.val_bench_dir:
        return d.val_bench_dir
    return os.path.join(d.cache_dir, f"val-s{d.val_bench_seed}-t{d.bench_triplets}-p{d.bench_pool}"
                                      f"-i{cfg.model.image_size}")


def training_urls(cfg: TrainConfig, di: DistInfo) -> list:
    """The training shard urls.  Given --data.train_shards, every local shard must exist (a
    missing one is a FileNotFoundError naming the flag, never silently skipped); without it,
    ShapesWorld is generated into `shapesworld_dir(cfg)` unless its manifest is there."""
    d = cfg.data
    if d.train_shards:
        try:
            urls = expand_urls(d.train_shards)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"data.train_shards: {e}") from e
        missing = [u for u in urls if not u.startswith(_REMOTE) and not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"data.train_shards: {len(missing)} of {len(urls)} shards do not exist "
                                    f"(first: {missing[0]!r})")
        return urls
    sw = shapesworld_dir(cfg)
    manifest = os.path.join(sw, "shapesworld.json")
    if di.is_main and not os.path.isfile(manifest):
        print(f"[data] generating {d.train_pairs} ShapesWorld pairs into {sw}", flush=True)
        write_shards(sw, d.train_pairs, seed=d.seed, shard_size=d.shard_size, image_size=cfg.model.image_size,
                     progress=cfg.run.progress)
    barrier()
    with open(manifest) as fh:
        m = json.load(fh)
    return [os.path.join(sw, s) for s in m["shards"]]


def prepare_benchmark(cfg: TrainConfig, di: DistInfo) -> str:
    """The test benchmark folder, built with `solar.benchmark.build_benchmark` when absent.  A
    --data.bench_dir that is missing or not a usable benchmark is an error that says why (no
    manifest, a damaged shard, a pair count that does not add up), never rebuilt."""
    d = cfg.data
    bench = bench_dir(cfg)
    if d.bench_dir and not os.path.isdir(bench):
        raise FileNotFoundError(f"data.bench_dir: {bench!r} does not exist")
    if di.is_main and not bm.benchmark_exists(bench):
        if d.bench_dir:
            try:
                bm.load_benchmark(bench, verify=True)
            except (bm.BenchmarkError, FileNotFoundError, ValueError) as e:
                raise bm.BenchmarkError(f"data.bench_dir: {bench!r} is not a usable benchmark: {e}") from None
            raise FileNotFoundError(f"data.bench_dir: {bench!r} is not a benchmark folder")
        print(f"[data] building the benchmark ({d.bench_triplets} triplets, {d.bench_pool} pool pairs) in {bench}",
              flush=True)
        bm.build_benchmark(bench, triplets=d.bench_triplets, pool=d.bench_pool, seed=d.bench_seed,
                           image_size=cfg.model.image_size)
    barrier()
    return bench


def prepare_val_benchmark(cfg: TrainConfig, di: DistInfo, bench: str) -> Optional[str]:
    """The validation benchmark folder (None when data.val_bench is off).

    Built like the test benchmark (`solar.benchmark.build_benchmark`, same sizes) from
    data.val_bench_seed and the item ids from BENCHMARK_ITEM_BASE + VAL_ITEM_BASE_OFFSET on, so it
    shares no item with training data or with the test benchmark `bench`; when it is built, that
    is verified with `solar.benchmark.check_no_overlap` (item ids and item contents) against the
    generated training data and the test benchmark, and a failed check removes it again.  Use
    it, never the test benchmark, for any hyperparameter or design choice."""
    d = cfg.data
    if not d.val_bench:
        return None
    val = val_bench_dir(cfg)
    if d.val_bench_dir and not os.path.isdir(val):
        raise FileNotFoundError(f"data.val_bench_dir: {val!r} does not exist")
    if os.path.abspath(val) == os.path.abspath(bench):
        raise ValueError(f"data.val_bench_dir: the validation benchmark must differ from the test benchmark {bench!r}")
    if di.is_main and not bm.benchmark_exists(val):
        if d.val_bench_dir:
            raise FileNotFoundError(f"data.val_bench_dir: {val!r} is not a benchmark folder")
        if d.val_bench_seed == d.bench_seed:
            raise ValueError(f"data.val_bench_seed: must differ from data.bench_seed ({d.bench_seed})")
        print(f"[data] building the validation benchmark ({d.bench_triplets} triplets, {d.bench_pool} pool pairs, "
              f"seed {d.val_bench_seed}) in {val}", flush=True)
        bm.build_benchmark(val, triplets=d.bench_triplets, pool=d.bench_pool, seed=d.val_bench_seed,
                           image_size=cfg.model.image_size, item_base=BENCHMARK_ITEM_BASE + VAL_ITEM_BASE_OFFSET,
                           progress=cfg.run.progress)
        try:
            if not d.train_shards:
                bm.check_no_overlap(shapesworld_dir(cfg), val)
            bm.check_no_overlap(bm.load_benchmark(bench).shards, val)
        except ValueError:
            shutil.rmtree(val, ignore_errors=True)
            raise
    barrier()
    return val


def prepare_data(cfg: TrainConfig, di: DistInfo) -> tuple:
    """(training urls, test benchmark folder): `training_urls` then `prepare_benchmark`."""
    urls = training_urls(cfg, di)
    return urls, prepare_benchmark(cfg, di)


def load_bank(urls, tokenizer, cfg: TrainConfig, limit: int = 0) -> PairBank:
    """Decode the training pairs (the first `limit` when > 0) once into a `PairBank` with
    cfg.model's image / text geometry and batches seeded by cfg.run.seed."""
    m = cfg.model
    mean, std = image_stats(m)   # the vision tower's own normalisation
    return load_pair_bank(urls, tokenizer, mean=mean, std=std, image_size=m.image_size, patch_size=m.patch_size,
                          max_length=m.max_text_len, seed=cfg.run.seed, num_workers=cfg.data.num_workers,
                          limit=limit, progress=cfg.run.progress)


def training_data(urls, tokenizer, cfg: TrainConfig, di: DistInfo) -> tuple:
    """(data, mining pool): a `PairBank` of every pair (data.in_memory) and no separate pool, or
    `ShardStreams` over the shards and a `solar.mining.PoolSource` naming the first
    stage2.mine_pool_size pairs as the pool (stage 2 streams it for mining, holding embeddings
    only, and for the document frequencies of the neutral caption tokens; nothing is decoded here)."""
    if cfg.data.in_memory:
        return load_bank(urls, tokenizer, cfg), None
    m = cfg.model
    mean, std = image_stats(m)
    pool = None
    if cfg.stage2.mine_k > 0 or 0 < cfg.stage2.text_neutral_df < 1:
        pool = PoolSource(urls, tokenizer, size=cfg.stage2.mine_pool_size, image_size=m.image_size,
                          patch_size=m.patch_size, max_length=m.max_text_len, num_workers=cfg.data.num_workers,
                          mean=mean, std=std)
    streams = ShardStreams(urls, tokenizer, mean=mean, std=std, image_size=m.image_size, patch_size=m.patch_size,
                           max_length=m.max_text_len, num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                           rank=di.rank, world=di.world)
    return streams, pool


def phase_data(data, global_batch: int, salt: int):
    """A phase's batches: the PairBank itself, or the phase's own stream (`salt` per phase, so
    the phases' shuffles differ)."""
    return data if isinstance(data, PairBank) else data.phase(global_batch, salt)


def describe_data(data, pool, urls, bench: str, di: DistInfo) -> str:
    """One line saying what the run trains on and evaluates against (printed by rank 0)."""
    if isinstance(data, PairBank):
        return (f"[data] {len(data)} training pairs in memory, benchmark {bench}, world size {di.world}, "
                f"device {di.device}")
    return (f"[data] streaming {len(urls)} shard(s) (mining pool {len(pool) if pool else 0} pairs), "
            f"benchmark {bench}, world size {di.world}, device {di.device}")
