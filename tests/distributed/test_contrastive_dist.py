"""contrastive_loss(process_group=...) on 2 gloo CPU processes equals the single-process loss
over the concatenated batch, with the same gradients and global mined indices; in the
rectangular form (offset=...) each rank's n rows against its m columns, compared with the
single-process rectangle over all columns, the paired ones moved first (offset 0)."""
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


M_LOCAL = 13
OFFSET = 3
RECT_CASES = {
    "rect_groups_hard_mined": dict(groups=True, hard=True, kw=dict(temperature=0.1, symmetric=True, hardness=0.5,
                                                                  mine_k=3)),
    "rect_plain_symmetric": dict(groups=False, hard=False, kw=dict(temperature=0.07, symmetric=True)),
    "rect_one_sided": dict(groups=False, hard=True, kw=dict(temperature=0.2, symmetric=False, mine_k=2)),
}


def _rect_batch():
    """Each rank's rows [n, D], columns [m, D], hard negatives and [m] column groups, stacked."""
    g = torch.Generator().manual_seed(99)
    q = torch.nn.functional.normalize(torch.randn(WORLD, N_LOCAL, D, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(WORLD, M_LOCAL, D, generator=g), dim=-1)
    hn = torch.nn.functional.normalize(torch.randn(WORLD, N_LOCAL, H, D, generator=g), dim=-1)
    groups = torch.randint(0, 8, (WORLD, M_LOCAL), generator=g)
    return q, k, hn, groups


def _run_rect(name, rank, pg):
    """Rank `rank`'s call with `pg`, or (pg None) the single-process rectangle over all columns
    with the paired columns first, its results mapped back to global column positions."""
    import solar_kernels as sk

    case = RECT_CASES[name]
    q, k, hn, groups = _rect_batch()
    if pg is not None:
        ql, kl, hl, gl, off = q[rank], k[rank], hn[rank], groups[rank], OFFSET
    else:
        paired = torch.tensor([r * M_LOCAL + OFFSET + i for r in range(WORLD) for i in range(N_LOCAL)])
        rest = torch.tensor([j for j in range(WORLD * M_LOCAL) if j not in set(paired.tolist())])
        perm = torch.cat([paired, rest])  # position p of the permuted columns is global column perm[p]
        ql, kl, hl = q.reshape(-1, D), k.reshape(-1, D)[perm], hn.reshape(-1, H, D)
        gl, off = groups.reshape(-1)[perm], 0
    ql, kl = ql.clone().requires_grad_(), kl.clone().requires_grad_()
    hl = hl.clone().requires_grad_() if case["hard"] else None
    with sk.use_backend("torch"):
        out = sk.contrastive_loss(ql, kl, groups=gl if case["groups"] else None, hard_negatives=hl, offset=off,
                                  process_group=pg, **case["kw"])
    loss, mined = out if isinstance(out, tuple) else (out, None)
    loss.backward()
    res = {"loss": loss.detach(), "dq": ql.grad, "dk": kl.grad}
    if hl is not None:
        res["dh"] = hl.grad
    if mined is not None:
        res["idx"], res["score"] = mined.indices, mined.scores
    if pg is None:
        res["dk"] = torch.empty_like(res["dk"]).index_copy_(0, perm, res["dk"])
        if mined is not None:
            m_all = WORLD * M_LOCAL
            idx = mined.indices
            res["idx"] = torch.where(idx < m_all, perm[idx.clamp_max(m_all - 1)], idx)
    return res


def _worker(rank, init_file, path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        q, k, hn, groups = _batch()
        out = {name: _run_case(name, q, k, hn, groups, dist.group.WORLD, rank) for name in CASES}
        out.update({name: _run_rect(name, rank, dist.group.WORLD) for name in RECT_CASES})
        try:  # ranks that disagree on the offset are refused, on every rank
            import solar_kernels as sk

            sk.contrastive_loss(torch.randn(2, D), torch.randn(5, D), offset=rank, process_group=dist.group.WORLD)
            out["offset_mismatch"] = "accepted"
        except ValueError as e:
            out["offset_mismatch"] = str(e)
        torch.save(out, os.path.join(path, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (aborted otherwise)
    finally:
        dist.destroy_process_group()


def test_gloo_two_processes_match_single_process():
    q, k, hn, groups = _batch()
    with tempfile.TemporaryDirectory() as path:
        mp.spawn(_worker, args=(os.path.join(path, "init"), path), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(path, f"rank{r}.pt")) for r in range(WORLD)]
    _assert_rect_matches(ranks)
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


def _assert_rect_matches(ranks):
    for name in RECT_CASES:
        full = _run_rect(name, 0, None)
        for r in range(WORLD):
            got = ranks[r][name]
            rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
            cols = slice(r * M_LOCAL, (r + 1) * M_LOCAL)
            torch.testing.assert_close(got["loss"], full["loss"], rtol=1e-5, atol=1e-6, msg=f"{name} loss rank {r}")
            for key, sl in (("dq", rows), ("dk", cols), ("dh", rows), ("score", rows)):
                if key in full:
                    torch.testing.assert_close(got[key], full[key][sl], rtol=1e-4, atol=1e-6,
                                               msg=f"{name} {key} rank {r}")
            if "idx" in full:
                assert torch.equal(got["idx"], full["idx"][rows]), f"{name} mined indices rank {r}"
        assert ranks[0]["offset_mismatch"].startswith("every rank must pass the same"), ranks[0]["offset_mismatch"]
        assert "[[2, 5, 0, 0], [2, 5, 0, 1]]" in ranks[1]["offset_mismatch"], ranks[1]["offset_mismatch"]
