"""contrastive_loss(process_group=...) on 2 gloo CPU processes equals the single-process loss
over the concatenated batch, with the same gradients and global mined indices."""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist

WORLD = 2
N_LOCAL = 9
D = 12
H = 2


def _batch():
    g = torch.Generator().manual_seed(1234)
    N = N_LOCAL * WORLD
    q = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    hn = torch.nn.functional.normalize(torch.randn(N, H, D, generator=g), dim=2)
    groups = torch.randint(0, 6, (N,), generator=g)
    return q, k, hn, groups


CASES = {
    "two_tower": dict(single=False, kw=dict(temperature=0.1, symmetric=True, hardness=0.5, mine_k=3)),
    "two_tower_plain": dict(single=False, kw=dict(temperature=0.07, symmetric=True), no_groups=True),
    "single_set": dict(single=True, kw=dict(temperature=0.2, hardness=0.0, mine_k=2)),
}


def _run_case(name, q, k, hn, groups, pg=None, rank=0):
    import solar_kernels as sk

    case = CASES[name]
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL) if pg is not None else slice(None)
    ql = q[sl].clone().requires_grad_()
    kl = None if case["single"] else k[sl].clone().requires_grad_()
    hl = hn[sl].clone().requires_grad_() if not case.get("no_groups") else None
    gl = groups[sl] if not case.get("no_groups") else None
    with sk.use_backend("torch"):
        out = sk.contrastive_loss(ql, kl, groups=gl, hard_negatives=hl, process_group=pg, **case["kw"])
    loss, mined = out if isinstance(out, tuple) else (out, None)
    loss.backward()
    res = {"loss": loss.detach(), "dq": ql.grad}
    if kl is not None:
        res["dk"] = kl.grad
    if hl is not None:
        res["dh"] = hl.grad
    if mined is not None:
        res["idx"] = mined.indices
        res["score"] = mined.scores
    return res


def _worker(rank, init_file, path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        q, k, hn, groups = _batch()
        out = {name: _run_case(name, q, k, hn, groups, dist.group.WORLD, rank) for name in CASES}
        torch.save(out, os.path.join(path, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (aborted otherwise)
    finally:
        dist.destroy_process_group()


def test_gloo_two_processes_match_single_process():
    q, k, hn, groups = _batch()
    with tempfile.TemporaryDirectory() as path:
        mp.spawn(_worker, args=(os.path.join(path, "init"), path), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(path, f"rank{r}.pt")) for r in range(WORLD)]
    for name in CASES:
        full = _run_case(name, q, k, hn, groups)
        for r in range(WORLD):
            got = ranks[r][name]
            sl = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
            torch.testing.assert_close(got["loss"], full["loss"], rtol=1e-5, atol=1e-6, msg=f"{name} loss rank {r}")
            for key in ("dq", "dk", "dh", "score"):
                if key in full:
                    torch.testing.assert_close(got[key], full[key][sl], rtol=1e-4, atol=1e-6,
                                               msg=f"{name} {key} rank {r}")
            if "idx" in full:
                assert torch.equal(got["idx"], full["idx"][sl]), f"{name} mined indices rank {r}"
