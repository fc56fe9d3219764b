"""The chunked PyTorch form of contrastive_loss (the CPU path; as csrc/pool/pool_cpu.cpp is for pooling).

The same tiled algorithm as the Triton kernels in ``solar_kernels.ops.contrastive``: tiles
of S = q k^T / temperature ([R, C] fp32, one reused buffer) are computed with a GEMM, reduced
into per-row (and per-column) log-sum-exp statistics and the running top-k of the negatives,
and recomputed in the backward pass, which builds dL/dS per tile and accumulates
dq += G k and dk += G^T q.  Memory stays O(N * D) plus one tile, except for the optional
cache of the first rows of S that the forward hands to the backward (at most
CPU_CACHE_PER_ND * n * D and CPU_CACHE_MAX_ELEMS elements).

The statistics and their meaning (A, B, C per row; the gradient formula) are described in
``solar_kernels.ops.contrastive``; the functions here return the same quantities as the
Triton launchers there.
"""
from __future__ import annotations

import torch

from .._topk import merge_topk, topk_lowest_index

# CPU tile budget (elements of one S tile).
CPU_TILE_ELEMS = 1 << 22
# CPU: logits of the first rows kept from forward to backward (when gradients are needed) so
# that backward skips their recompute; at most this many times n * D elements (O(N * D)).
CPU_CACHE_PER_ND = 2
CPU_CACHE_MAX_ELEMS = 1 << 24  # and at most 64 MiB: at large N the saved share is small anyway


def _cpu_tiles(n: int, N: int) -> tuple[int, int]:
    C = min(N, 8192)
    R = min(n, max(32, CPU_TILE_ELEMS // max(C, 1)))
    return max(R, 1), max(C, 1)


def tile_masks(gq, gk, r0, r1, c0, c1, offset, single, device):
    """(pos, diag) for the CPU tile rows [r0, r1) x columns [c0, c1); pos None = diagonal only."""
    pos = None
    if gq is not None:
        pos = gq[r0:r1, None] == gk[None, c0:c1]
    # diagonal entries (global column == row + offset) inside this tile
    lo = max(r0 + offset, c0)
    hi = min(r1 + offset, c1)
    diag = None
    if lo < hi:
        rr = torch.arange(lo - offset - r0, hi - offset - r0, device=device)
        cc = torch.arange(lo - c0, hi - c0, device=device)
        diag = (rr, cc)
    return pos, diag


def _neg_inf_where(mask, x):
    return x.masked_fill(~mask, float("-inf"))


def cache_rows(n: int, N: int, D: int, backend: str, need_grad: bool) -> int:
    """Rows of S the CPU forward keeps for the backward (0 on Triton or without gradients)."""
    if backend == "triton" or not need_grad:
        return 0
    return int(min(n, min(CPU_CACHE_PER_ND * n * D, CPU_CACHE_MAX_ELEMS) // max(N, 1)))


def stats_torch(q, k, gq, gk, offset, inv_t, beta, single, mine_k, both, cache=None):
    """Chunked-PyTorch statistics: row stats (and column stats when `both`) in one sweep.

    Args as the Triton launchers': q [n, D] rows, k [N, D] columns, gq / gk group ids or
    None, offset (global column of row 0's own column), inv_t = 1 / temperature, beta =
    hardness, single (single-set mode: the diagonal is no column), mine_k (0: no mining).
    `cache` ([rc, N] fp32 or None) receives the logits of the first rc rows.

    Returns ((A, B, C) [n] fp32 each, C None when beta == 0; the column statistics [A, B, C]
    of the k -> q direction when `both`, else None; (values, columns) [n, mine_k] of each
    row's best in-batch negatives, best first, when mine_k > 0, else None).  -inf marks an
    empty set."""
    n, D = q.shape
    N = k.shape[0]
    dev = q.device
    hard = beta > 0
    qf = q.float()  # no copy for fp32 inputs
    kf = k.float()
    R, C = _cpu_tiles(n, N)
    buf = torch.empty(R * C, device=dev)  # one tile buffer, reused
    diag_pos = gq is None and not single
    rows_A = torch.full((n,), float("-inf"), device=dev)
    rows_B = torch.full((n,), float("-inf"), device=dev)
    rows_C = torch.full((n,), float("-inf"), device=dev) if hard else None
    cols = None
    if both:
        cols = [torch.full((N,), float("-inf"), device=dev), torch.full((N,), float("-inf"), device=dev),
                torch.full((N,), float("-inf"), device=dev) if hard else None]
    top_v = top_i = None
    for r0 in range(0, n, R):
        r1 = min(n, r0 + R)
        rA = None if diag_pos else torch.full((r1 - r0,), float("-inf"), device=dev)
        rB = torch.full((r1 - r0,), float("-inf"), device=dev)
        rC = torch.full((r1 - r0,), float("-inf"), device=dev) if hard else None
        tv = ti = None
        for c0 in range(0, N, C):
            c1 = min(N, c0 + C)
            s = _logits(buf, qf[r0:r1], kf[c0:c1], inv_t)
            pos, diag = tile_masks(gq, gk, r0, r1, c0, c1, offset, single, q.device)
            if diag_pos and diag is not None:
                # the positive is the diagonal logit itself, taken from the tile that B's
                # log-sum-exp sees (and the backward recomputes), so that B - A >= 0 in fp32
                rows_A[r0 + diag[0]] = s[diag]
            if single and diag is not None:
                s[diag] = float("-inf")
            if cache is not None and r0 < cache.shape[0]:
                h = min(r1, cache.shape[0]) - r0
                cache[r0:r0 + h, c0:c1].copy_(s[:h])
            need_neg = hard or mine_k > 0
            pos_t = pos_full(pos, diag, s) if (need_neg or not diag_pos) else None
            if not diag_pos:
                sp = _neg_inf_where(pos_t, s)
                rA = torch.logaddexp(rA, torch.logsumexp(sp, 1))
                if both:
                    cols[0][c0:c1] = torch.logaddexp(cols[0][c0:c1], torch.logsumexp(sp, 0))
            sn = _neg_inf_where(~pos_t, s) if need_neg else None  # diagonal already -inf (single)
            if hard:
                t1 = sn * (1.0 + beta)
                t2 = sn * beta
                rB = torch.logaddexp(rB, torch.logsumexp(t1, 1))
                rC = torch.logaddexp(rC, torch.logsumexp(t2, 1))
                if both:
                    cols[1][c0:c1] = torch.logaddexp(cols[1][c0:c1], torch.logsumexp(t1, 0))
                    cols[2][c0:c1] = torch.logaddexp(cols[2][c0:c1], torch.logsumexp(t2, 0))
                del t1, t2
            elif both:
                lse_r, lse_c = _lse_rows_cols(s)
                rB = torch.logaddexp(rB, lse_r)
                cols[1][c0:c1] = torch.logaddexp(cols[1][c0:c1], lse_c)
            else:
                rB = torch.logaddexp(rB, torch.logsumexp(s, 1))
            if mine_k > 0:
                v, i = topk_lowest_index(sn, mine_k)
                if tv is None:
                    tv, ti = v, i + c0
                else:
                    # best-first lists, the earlier tile's columns all lower: ties already in column order
                    tv, ti = merge_topk(torch.cat([tv, v], 1), torch.cat([ti, i + c0], 1), mine_k,
                                        ties_in_id_order=True)
        if not diag_pos:
            rows_A[r0:r1] = rA
        rows_B[r0:r1] = rB
        if hard:
            rows_C[r0:r1] = rC
        if mine_k > 0:
            if tv.shape[1] < mine_k:  # fewer in-batch columns than mine_k: empty slots (-inf, -1)
                pad = mine_k - tv.shape[1]
                tv = torch.cat([tv, torch.full((tv.shape[0], pad), float("-inf"), device=dev)], 1)
                ti = torch.cat([ti, torch.full((ti.shape[0], pad), -1, dtype=torch.int64, device=dev)], 1)
            if top_v is None:
                top_v = torch.empty((n, mine_k), device=dev)
                top_i = torch.empty((n, mine_k), dtype=torch.int64, device=dev)
            top_v[r0:r1] = tv
            top_i[r0:r1] = ti
    if both and diag_pos:
        # column offset + i's only positive is row i (the same logit); other columns have none
        lo, hi = max(offset, 0), min(offset + n, N)
        if lo < hi:
            cols[0][lo:hi] = rows_A[lo - offset:hi - offset]
    mined = (top_v, top_i) if mine_k > 0 else None
    return (rows_A, rows_B, rows_C), cols, mined


def bwd_torch(q, k, gq, gk, offset, inv_t, beta, single, rstats, cstats, cache=None):
    """Chunked-PyTorch backward: recompute each S tile (or read the forward's cached rows),
    G = dL/dS, dq += G k, dk += G^T q.  Tiles read from `cache` are never written to.

    rstats / cstats: [4, n] / [4, N] (r, A, B, C) coefficients of the row and column
    directions (cstats None: rows only).  Returns (dq [n, D], dk [N, D]) in fp32."""
    n_cached = 0 if cache is None else cache.shape[0]
    n, D = q.shape
    N = k.shape[0]
    dev = q.device
    hard = beta > 0
    qf = q.float()
    kf = k.float()
    dq = torch.zeros((n, D), dtype=torch.float32, device=dev)
    dk = torch.zeros((N, D), dtype=torch.float32, device=dev)
    R, C = _cpu_tiles(n, N)
    buf = torch.empty(R * C, device=dev)
    both = cstats is not None

    def direction(s, pos_t, diag, r, a, b, c, dim):
        # s: tile (masked -inf where invalid); stats broadcast along `dim` (1: rows, 0: cols)
        ex = (lambda v: v[:, None]) if dim == 1 else (lambda v: v[None, :])
        if hard:
            sn = s if pos_t is None and diag is None else s.masked_fill(pos_full(pos_t, diag, s), float("-inf"))
            g = sn.mul(1.0 + beta).sub_(ex(b)).exp_().mul_(1.0 + beta)
            g.sub_(sn.mul(beta).sub_(ex(c)).exp_().mul_(beta))
        else:
            g = s.sub(ex(b)).exp_()
        if pos_t is None:  # diagonal positives only: exp(S_ii - A_i) == 1 exactly
            if diag is not None:
                g[diag] -= 1.0
        else:
            g.sub_(s.sub(ex(a)).exp_().masked_fill_(~pos_t, 0.0))
        return g.mul_(ex(r))

    for r0 in range(0, n, R):
        r1 = min(n, r0 + R)
        rr, ra, rb, rc = (rstats[j][r0:r1] for j in range(4))
        for c0 in range(0, N, C):
            c1 = min(N, c0 + C)
            h = max(0, min(r1, n_cached) - r0)
            if h == r1 - r0:
                s = cache[r0:r1, c0:c1]  # read-only: the diagonal was masked in forward
            else:
                s = buf[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                if h:
                    s[:h].copy_(cache[r0:r0 + h, c0:c1])
                s[h:].addmm_(qf[r0 + h:r1], kf[c0:c1].t(), beta=0, alpha=inv_t)
            pos, diag = tile_masks(gq, gk, r0, r1, c0, c1, offset, single, q.device)
            if single and diag is not None and h < r1 - r0:
                s[diag] = float("-inf")
            g = None
            if both:
                cr, ca, cb, cc = (cstats[j][c0:c1] for j in range(4))
                if not hard:
                    g = _both_directions_plain(s, pos, diag, rr, ra, rb, cr, ca, cb)
            if g is None:
                g = direction(s, pos, diag, rr, ra, rb, rc, 1)
                if both:
                    g.add_(direction(s, pos, diag, cr, ca, cb, cc, 0))
            dq[r0:r1].addmm_(g, kf[c0:c1], alpha=inv_t)
            dk[c0:c1].addmm_(g.t(), qf[r0:r1], alpha=inv_t)
    return dq, dk


def _logits(buf: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inv_t: float) -> torch.Tensor:
    """S tile = a b^T * inv_t written into the reused buffer (the scale rides on the GEMM)."""
    out = buf[:a.shape[0] * b.shape[0]].view(a.shape[0], b.shape[0])
    return out.addmm_(a, b.t(), beta=0, alpha=inv_t)


# Largest spread of log-sum-exp shifts for which one exp per element serves both
# directions (exp(-80) is still a normal fp32 number); wider tiles take the exact path.
_SHARED_EXP_RANGE = 80.0


def _lse_rows_cols(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of a tile with one exp pass when the tile's range allows.

    e = exp(s - rowmax) gives the row sums; the column sums are e^T exp(rowmax - mu), a
    matrix-vector product (mu = the tile max).  Exact unless a row or column max lies more
    than _SHARED_EXP_RANGE below mu, in which case the two plain logsumexps are used.
    """
    m_r = s.amax(1)
    m_c = s.amax(0)
    mu = m_r.max()
    if float(mu - torch.minimum(m_r.min(), m_c.min())) >= _SHARED_EXP_RANGE:
        return torch.logsumexp(s, 1), torch.logsumexp(s, 0)
    e = s.sub(m_r[:, None]).exp_()
    lse_r = e.sum(1).log_().add_(m_r)
    lse_c = torch.mv(e.t(), torch.exp(m_r - mu)).log_().add_(mu)
    return lse_r, lse_c


def _both_directions_plain(s, pos, diag, r, a, b, rc, ac, bc):
    """G of both directions for hardness 0 with one exp per element (None: range too wide).

    r_i exp(s - b_i) + c_j exp(s - bc_j) = e_ij (r_i + u_i c_j v_j), e = exp(s - b_i),
    u_i = exp(b_i - rho), v_j = exp(rho - bc_j), rho = max_i b_i; both factors stay finite
    and normal when b and bc span less than _SHARED_EXP_RANGE.
    """
    rho = b.max()
    if float(rho - torch.minimum(b.min(), bc.min())) >= _SHARED_EXP_RANGE:
        return None
    e = s.sub(b[:, None]).exp_()
    fac = torch.outer(torch.exp(b - rho), rc * torch.exp(rho - bc)).add_(r[:, None])
    g = e.mul_(fac)
    del fac
    if pos is None:  # diagonal positives: exp(S_ii - A_i) == 1 in both directions
        if diag is not None:
            g[diag] -= r[diag[0]] + rc[diag[1]]
    else:
        g.sub_(s.sub(a[:, None]).exp_().mul_(r[:, None]).add_(s.sub(ac[None, :]).exp_().mul_(rc[None, :]))
               .masked_fill_(~pos, 0.0))
    return g


def pos_full(pos_t, diag, s):
    """The positives of a tile as a bool mask like s: pos_t, or the diagonal entries `diag`
    when pos_t is None (no groups)."""
    if pos_t is not None:
        return pos_t
    m = torch.zeros_like(s, dtype=torch.bool)
    if diag is not None:
        m[diag] = True
    return m


def mine_chunked(q, k, gq, gk, offset, inv_t, single, mine_k):
    """The mine_k best negatives per row for mine_k above the Triton statistics kernel's
    in-register bound (contrastive_triton.MAX_KERNEL_MINE_K): S in row chunks of
    at most CPU_TILE_ELEMS elements (fp32 matmul, any device), exact top-k with ties to the
    lower column.  Same contract as the kernel's (values, indices), sorted."""
    n, N = q.shape[0], k.shape[0]
    R = max(1, min(n, CPU_TILE_ELEMS // max(N, 1)))
    kf = k.float()
    tv = torch.empty((n, mine_k), device=q.device, dtype=torch.float32)
    ti = torch.empty((n, mine_k), device=q.device, dtype=torch.int64)
    for r0 in range(0, n, R):
        r1 = min(n, r0 + R)
        s = q[r0:r1].float() @ kf.t() * inv_t
        pos, diag = tile_masks(gq, gk, r0, r1, 0, N, offset, single, q.device)
        s = s.masked_fill(pos_full(pos, diag, s), float("-inf"))
        if single and diag is not None:
            s[diag] = float("-inf")
        tv[r0:r1], ti[r0:r1] = topk_lowest_index(s, mine_k)
    return tv, ti
