"""Sharded search: two gloo ranks on CPU each hold a shard; the merged global top-k must
equal a single index over the concatenated shards."""
from __future__ import annotations

import os

import pytest
import torch

from solar_kernels import _ext

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(not _ext.available("search_topk_cpu"), reason="native extension not available"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available"),
]

SIZES = (70, 23)  # uneven shards; k = 40 exceeds the second shard
D = 37


def _data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(sum(SIZES), D, generator=g)
    x[80] = x[5]  # a tie across shards: id 5 (rank 0) must come before id 80 (rank 1)
    q = torch.randn(6, D, generator=g)
    q[0] = x[5]
    return q, x


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from solar_kernels import Index

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, x = _data()
        lo = sum(SIZES[:rank])
        for dtype in ("fp32", "int8"):
            index = Index(D, dtype=dtype)
            index.add(x[lo : lo + SIZES[rank]])
            for k in (1, 10, 40, sum(SIZES)):
                s, i = index.search(q, k, process_group=dist.group.WORLD)
                torch.save((s, i), os.path.join(out_dir, f"r{rank}_{dtype}_{k}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_sharded_search_matches_single_index(tmp_path):
    import torch.multiprocessing as mp

    from solar_kernels import Index

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    q, x = _data()
    for dtype in ("fp32", "int8"):
        full = Index(D, dtype=dtype)
        full.add(x)
        for k in (1, 10, 40, sum(SIZES)):
            s_ref, i_ref = full.search(q, k)
            for rank in (0, 1):
                s, i = torch.load(tmp_path / f"r{rank}_{dtype}_{k}.pt")
                assert torch.equal(i, i_ref), f"rank {rank} {dtype} k={k}: ids differ"
                torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-5)
        assert i_ref[0, :2].tolist() == [5, 80] or dtype == "int8"
