"""Run a function on `world` gloo ranks (spawned CPU processes) and collect their results.

Shared by the distributed stage-1 and training tests.  Each rank joins through a file
rendezvous (no probed TCP port that another process could take in between), runs
`fn(dist_info, *args)`, writes its json-able result, and waits at a barrier before tearing
gloo down (a rank destroying the group while another still talked to it aborted runs).
`fn` must be a module-level function (spawn pickles it by name).
"""
import json
import os

import torch.multiprocessing as mp


def _entry(fn, rank, world, rdzv, out_dir, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from solar.distributed import barrier, init_distributed
    di = init_distributed("cpu", init_method="file://" + rdzv)
    try:
        res = fn(di, *args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(res, fh)
        barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, out_dir, *args, world: int = 2, timeout: float = 240) -> list:
    """Results of fn(dist_info, *args) on each of `world` ranks, in rank order."""
    out_dir = str(out_dir)
    ctx = mp.get_context("spawn")
    rdzv = os.path.join(out_dir, "rdzv")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, rdzv, out_dir, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]
