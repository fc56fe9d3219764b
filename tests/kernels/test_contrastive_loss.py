"""contrastive_loss / pooled_contrastive_loss against the fp64 reference that materialises S.

Both implementations are tested on every machine: the chunked PyTorch path ("torch") and
the Triton kernels ("triton": compiled on CUDA, interpreted on CPU tensors).
"""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import solar_kernels as sk
from solar_kernels import nn as snn
from solar_kernels.ops import contrastive as cl
from solar_kernels.ops import contrastive_cpu as cl_cpu
from solar_kernels.ops import contrastive_triton as ct
from solar_kernels.reference import contrastive_loss_reference, masked_pool_reference

# tests/oracle.py (on sys.path: conftest.py)
from oracle import assert_contrastive_loss_matches_reference, assert_mined_loss_matches_fp64

# the Triton interpreter evaluates both sides of tl.where (log(0), exp overflow in unused lanes)
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

BACKENDS = ["torch", "triton"]
SIZES = [1, 2, 17, 63, 64, 65]


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _groups(kind: str, n: int, gen: torch.Generator):
    if kind == "none":
        return None
    if kind == "singletons":
        return torch.randperm(n, generator=gen)
    if kind == "pairs":
        return torch.arange(n) // 2
    if kind == "uneven":
        return torch.randint(0, max(1, n // 3), (n,), generator=gen)
    if kind == "lonely":  # some groups of one (rows without a positive in single-set mode)
        g = torch.arange(n) // 3
        g[::4] = n + torch.arange(len(g[::4]))
        return g
    raise AssertionError(kind)


def _make(n, d, h, dtype, seed, single, gkind):
    gen = torch.Generator().manual_seed(seed)
    dev = _dev()
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    k = None if single else torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    hn = torch.nn.functional.normalize(torch.randn(n, h, d, generator=gen), dim=2) if h else None
    g = _groups(gkind, n, gen)
    cast = lambda t: None if t is None else t.to(dev, dtype).requires_grad_()  # noqa: E731
    return cast(q), cast(k), cast(hn), (g.to(dev) if g is not None else None)


def _expected_error(n, h, single, groups, mine_k):
    """The ValueError the inputs must raise, or None."""
    if groups is not None:
        counts = (groups[:, None] == groups[None, :]).sum(1)
        min_neg = int((n - counts).min()) + h
        if single and not bool((counts > 1).any()):
            return "no row has a positive"
        if int((n - counts).max()) + h == 0:
            return "no row has a negative"
    else:
        min_neg = n - 1 + h
        if min_neg == 0:
            return "no row has a negative"
    if mine_k > min_neg:
        return "mine_k"
    return None


def _run_vs_reference(backend, n, d, h, dtype, temperature, hardness, gkind, single, symmetric, mine_k, seed):
    q, k, hn, groups = _make(n, d, h, dtype, seed, single, gkind)
    if single and groups is None:
        groups = torch.zeros(n, dtype=torch.int64, device=q.device)
    kw = dict(groups=groups, temperature=temperature, symmetric=symmetric, hardness=hardness, mine_k=mine_k)
    assert_contrastive_loss_matches_reference(backend, q, k, hn, kw, _expected_error(n, h, single, groups, mine_k))


_shape_strategy = dict(
    n=st.sampled_from(SIZES), d=st.sampled_from([1, 8, 33]), h=st.sampled_from([0, 1, 3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    temperature=st.sampled_from([0.05, 0.1, 1.0]), hardness=st.sampled_from([0.0, 0.5, 2.0]),
    gkind=st.sampled_from(["none", "singletons", "pairs", "uneven", "lonely"]), single=st.booleans(),
    symmetric=st.booleans(), mine_k=st.sampled_from([0, 1, 3]), seed=st.integers(0, 2 ** 16))


@given(**_shape_strategy)
@example(n=65, d=33, h=3, dtype=torch.float32, temperature=0.05, hardness=0.5, gkind="uneven", single=False,
         symmetric=True, mine_k=3, seed=0)
@example(n=64, d=8, h=0, dtype=torch.float32, temperature=0.1, hardness=0.0, gkind="lonely", single=True,
         symmetric=False, mine_k=1, seed=1)
@example(n=1, d=8, h=0, dtype=torch.float32, temperature=0.1, hardness=0.0, gkind="none", single=False,
         symmetric=True, mine_k=0, seed=2)
# d = 1: dq cancels to ~3e-14 from terms ~20 (failed under the per-tensor tolerance)
@example(n=1, d=1, h=3, dtype=torch.float32, temperature=0.05, hardness=2.0, gkind="none", single=False,
         symmetric=False, mine_k=0, seed=1)
def test_torch_backend_vs_reference(n, d, h, dtype, temperature, hardness, gkind, single, symmetric, mine_k, seed):
    _run_vs_reference("torch", n, d, h, dtype, temperature, hardness, gkind, single, symmetric, mine_k, seed)


def _cap_on_gpu(fn):
    """On CUDA every new constexpr combination compiles (seconds each): cap the examples so that
    bench/gpu_check.sh's test step stays inside its budget."""
    return settings(max_examples=20)(fn) if torch.cuda.is_available() else fn


@_cap_on_gpu
@given(**_shape_strategy)
@example(n=65, d=33, h=2, dtype=torch.bfloat16, temperature=0.05, hardness=2.0, gkind="pairs", single=False,
         symmetric=True, mine_k=3, seed=3)
@example(n=17, d=8, h=1, dtype=torch.float32, temperature=0.1, hardness=0.5, gkind="lonely", single=True,
         symmetric=False, mine_k=3, seed=4)
def test_triton_backend_vs_reference(n, d, h, dtype, temperature, hardness, gkind, single, symmetric, mine_k, seed):
    _run_vs_reference("triton", n, d, h, dtype, temperature, hardness, gkind, single, symmetric, mine_k, seed)


@pytest.mark.parametrize("case", [
    dict(n=17, h=2, hardness=0.5, gkind="pairs", single=False, symmetric=True, mine_k=3, seed=11),
    dict(n=17, h=1, hardness=0.0, gkind="lonely", single=True, symmetric=False, mine_k=2, seed=12),
], ids=["two-tower-hard-mined", "single-set-mined"])
def test_triton_several_d_chunks(monkeypatch, case):
    """The S tile and the backward's grad tile and GEMMs sweep D in BLOCK_D chunks.  Under the
    interpreter BLOCK_D is next_pow2(D) (one chunk), so force BLOCK_D = 16 with d = 33: three
    chunks, the last of one column; forward, backward, hard negatives and mining against the
    reference."""
    real = ct.kernel_configs

    def small_d_chunks(*args, **kwargs):
        configs = real(*args, **kwargs)
        for c in configs:
            c.kwargs["BLOCK_D"] = 16
        return configs

    monkeypatch.setattr(ct, "kernel_configs", small_d_chunks)
    for kernel in ("stats", "grad", "gemm_dq", "gemm_dk"):
        (cfg,) = ct.kernel_configs(kernel, torch.float32, 17, 17, 33, "interpreter")
        assert -(-33 // cfg.kwargs["BLOCK_D"]) == 3
    _run_vs_reference("triton", d=33, dtype=torch.float32, temperature=0.1, **case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mining_ties_go_to_lower_index(backend):
    # integer vectors, temperature 1: every logit is an exact integer, so ties are exact
    dev = _dev()
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = base[torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1, 0])].to(dev)
    q = base[torch.tensor([2, 2, 0, 1, 2, 0, 1, 1, 0, 2])].to(dev)
    hn = k[:, None, :].expand(10, 2, 2).contiguous()  # hard negatives tie with in-batch columns
    with sk.use_backend(backend):
        loss, mined = sk.contrastive_loss(q, k, hard_negatives=hn, temperature=1.0, mine_k=5)
    _, (idx, sc) = contrastive_loss_reference(q, k, hard_negatives=hn, temperature=1.0, mine_k=5,
                                              dtype=torch.float64)
    assert torch.equal(mined.indices.cpu(), idx.cpu())
    torch.testing.assert_close(mined.scores.double(), sc)
    # spot check: row 0 (q = [1, 1]) scores 2 on columns 2, 5, 6 (diagonal 0 is the positive)
    assert mined.indices[0, :3].tolist() == [2, 5, 6]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = _dev()
    gen = torch.Generator().manual_seed(5)
    qb = torch.randn(40, 2 * 24, generator=gen).to(dev)
    kb = torch.randn(24, 40, generator=gen).to(dev)
    q = qb[:, ::2].requires_grad_()  # strided columns
    k = kb.t().requires_grad_()  # transposed
    hn = torch.randn(3, 40, 24, generator=gen).to(dev).transpose(0, 1).requires_grad_()
    groups = (torch.arange(40) // 4).to(dev)
    kw = dict(groups=groups, hard_negatives=hn, temperature=0.5, hardness=0.5, mine_k=2)
    assert_mined_loss_matches_fp64(backend, q, k, hn, kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_a_tiled_batch(backend):
    # more rows than one tile in both dimensions of the interpreter's blocks
    dev = _dev()
    q, k, hn, groups = _make(130, 20, 2, torch.float32, 9, False, "uneven")
    kw = dict(groups=groups, hard_negatives=hn, temperature=0.07, hardness=1.0, mine_k=4)
    assert_mined_loss_matches_fp64(backend, q, k, hn, kw)
    assert q.device == dev


@pytest.mark.parametrize("cache_per_nd", [0, 0.3, 20])
@pytest.mark.parametrize("single", [False, True])
def test_torch_tiles_and_logits_cache(monkeypatch, cache_per_nd, single):
    """Several row/column tiles, with no / a partial / a full cache of forward logits."""
    monkeypatch.setattr(cl_cpu, "CPU_TILE_ELEMS", 64 * 48)
    monkeypatch.setattr(cl_cpu, "CPU_CACHE_PER_ND", cache_per_nd)
    monkeypatch.setattr(cl_cpu, "_cpu_tiles", lambda n, N: (min(n, 48), min(N, 64)))
    for hardness, mine_k in ((0.0, 0), (0.7, 3)):
        q, k, hn, groups = _make(150, 16, 2, torch.float32, 21, single, "uneven")
        kw = dict(groups=groups, hard_negatives=hn, temperature=0.05, hardness=hardness, mine_k=mine_k)
        with sk.use_backend("torch"):
            out = sk.contrastive_loss(q, k, **kw)
        loss = out[0] if mine_k else out
        tensors = [t for t in (q, k, hn) if t is not None]
        got = torch.autograd.grad(loss, tensors)
        out64 = contrastive_loss_reference(q, k, dtype=torch.float64, **kw)
        loss64 = out64[0] if mine_k else out64
        ref = torch.autograd.grad(loss64, tensors)
        torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
        if mine_k:
            assert torch.equal(out[1].indices, out64[1][0])


def test_torch_wide_logit_range_takes_the_exact_path():
    """Logit spreads beyond the shared-exp range (unnormalised inputs, small temperature)."""
    q, k, _, _ = _make(40, 8, 0, torch.float32, 3, False, "none")
    q = (q.detach() * torch.linspace(0.1, 30, 40)[:, None]).requires_grad_()
    with sk.use_backend("torch"):
        loss = sk.contrastive_loss(q, k, temperature=0.05)
    got = torch.autograd.grad(loss, (q, k))
    loss64 = contrastive_loss_reference(q, k, temperature=0.05, dtype=torch.float64)
    ref = torch.autograd.grad(loss64, (q, k))
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-4)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hard_negatives_and_no_grad(backend):
    q, k, _, groups = _make(10, 8, 0, torch.float32, 4, False, "pairs")
    hn = torch.zeros(10, 0, 8, device=q.device, requires_grad=True)
    with sk.use_backend(backend):
        loss = sk.contrastive_loss(q, k, groups=groups, hard_negatives=hn, temperature=0.1)
        with torch.no_grad():
            loss_ng = sk.contrastive_loss(q, k, groups=groups, temperature=0.1)
    dq, dk, dh = torch.autograd.grad(loss, (q, k, hn))
    assert dh.shape == hn.shape
    ref = contrastive_loss_reference(q, k, groups=groups, temperature=0.1, dtype=torch.float64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_ng, loss.detach())


def test_cpu_memory_is_not_quadratic(monkeypatch):
    """fwd+bwd at N=2048 on CPU with 64K-element tiles: peak RSS growth far below N x N fp32 (16 MiB)."""
    if not hasattr(__import__("os"), "sched_getaffinity"):
        pytest.skip("Linux only")
    monkeypatch.setattr(cl_cpu, "CPU_TILE_ELEMS", 1 << 16)
    n, d = 2048, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, d, generator=gen).requires_grad_()
    k = torch.randn(n, d, generator=gen).requires_grad_()
    groups = torch.arange(n) // 2

    def run():
        with sk.use_backend("torch"):
            loss = sk.contrastive_loss(q, k, groups=groups, hardness=0.5, temperature=0.1)
        loss.backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded CI box makes OpenMP regions crawl; the memory bound is the point
    try:
        run()  # warm up allocator / lazy init
        growth_kib = _peak_growth_kib(run)
    finally:
        torch.set_num_threads(threads)
    nn_mib = n * n * 4 / 2 ** 20
    assert growth_kib / 1024 < 0.25 * nn_mib, f"peak growth {growth_kib / 1024:.1f} MiB vs N x N {nn_mib} MiB"


def _peak_growth_kib(fn):
    def status_kb(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    fn()
    return status_kb("VmHWM") - base


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(9, 6, generator=gen, requires_grad=True)
    k = torch.randn(9, 6, generator=gen, requires_grad=True)
    hn = torch.randn(9, 2, 6, generator=gen, requires_grad=True)
    g = torch.arange(9) // 3
    args = (q, k, g, g, hn, 0, 0.1, 0.5, False, True, 2, "torch", 4)
    torch.library.opcheck(torch.ops.solar.contrastive_fwd.default, args)
    row_loss, col_loss, rs, cs, _, _, cache = torch.ops.solar.contrastive_fwd(*args)
    assert cache.shape == (4, 9)
    bargs = (torch.ones_like(row_loss), torch.ones_like(col_loss), q.detach(), k.detach(), g, g, hn.detach(), rs, cs,
             0, 0.1, 0.5, False, True, "torch", cache)
    torch.library.opcheck(torch.ops.solar.contrastive_bwd.default, bargs)
    single = (q, q, g, g, None, 0, 0.2, 0.0, True, False, 1, "torch", 0)
    torch.library.opcheck(torch.ops.solar.contrastive_fwd.default, single)


def test_torch_compile_traces_the_op():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(12, 8, generator=gen, requires_grad=True)
    k = torch.randn(12, 8, generator=gen, requires_grad=True)
    g = torch.arange(12) // 2

    def f(q, k):
        with sk.use_backend("torch"):
            return sk.contrastive_loss(q, k, groups=g, temperature=0.1)

    try:
        compiled = torch.compile(f, backend="eager", fullgraph=False)
        out = compiled(q, k)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
    torch.testing.assert_close(out, f(q, k))


# -- bad inputs -------------------------------------------------------------------------
def _ok():
    q = torch.randn(6, 4)
    return q, torch.randn(6, 4)


@pytest.mark.parametrize("case, exc, match", [
    (lambda q, k: sk.contrastive_loss(q[0], k), ValueError, "q must have 2 dimensions"),
    (lambda q, k: sk.contrastive_loss(q, k[:5]), ValueError, "k must have the shape"),
    (lambda q, k: sk.contrastive_loss(q, k[:, :3]), ValueError, "k must have the shape"),
    (lambda q, k: sk.contrastive_loss(q, k.double()), TypeError, "k must have dtype"),
    (lambda q, k: sk.contrastive_loss(q.long(), k), TypeError, "q must have dtype"),
    (lambda q, k: sk.contrastive_loss(q, k.half()), TypeError, "k must have q's dtype"),
    (lambda q, k: sk.contrastive_loss(q, k, groups=torch.arange(5)), ValueError, "groups must have length"),
    (lambda q, k: sk.contrastive_loss(q, k, groups=torch.arange(6).int()), TypeError, "groups must have dtype int64"),
    (lambda q, k: sk.contrastive_loss(q, k, groups=torch.arange(6.0)), TypeError, "groups must have dtype int64"),
    (lambda q, k: sk.contrastive_loss(q, k, temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda q, k: sk.contrastive_loss(q, k, temperature=-1.0), ValueError, "temperature must be > 0"),
    (lambda q, k: sk.contrastive_loss(q, k, temperature=float("nan")), ValueError, "temperature must be a finite"),
    (lambda q, k: sk.contrastive_loss(q, k, hardness=-0.5), ValueError, "hardness must be >= 0"),
    (lambda q, k: sk.contrastive_loss(q, k, mine_k=6), ValueError, "mine_k = 6 is larger"),
    (lambda q, k: sk.contrastive_loss(q, k, groups=torch.arange(6) // 2, mine_k=5), ValueError, "mine_k = 5"),
    (lambda q, k: sk.contrastive_loss(q, k, mine_k=-1), ValueError, "mine_k must be an int"),
    (lambda q, k: sk.contrastive_loss(q, k, mine_k=1.5), ValueError, "mine_k must be an int"),
    (lambda q, k: sk.contrastive_loss(q.clone().index_fill_(0, torch.tensor([2]), float("nan")), k), ValueError,
     "q has 4 non-finite"),
    (lambda q, k: sk.contrastive_loss(q, k.clone().index_fill_(0, torch.tensor([1]), float("inf"))), ValueError,
     "k has 4 non-finite"),
    (lambda q, k: sk.contrastive_loss(q, k, hard_negatives=torch.randn(6, 2, 3)), ValueError,
     "hard_negatives must have shape"),
    (lambda q, k: sk.contrastive_loss(q, k, hard_negatives=torch.randn(6, 4)), ValueError,
     "hard_negatives must have 3 dimensions"),
    (lambda q, k: sk.contrastive_loss(q, k, hard_negatives=torch.full((6, 1, 4), float("nan"))), ValueError,
     "hard_negatives has 24 non-finite"),
    (lambda q, k: sk.contrastive_loss(q), ValueError, "single-set mode"),
    (lambda q, k: sk.contrastive_loss(q, groups=torch.arange(6)), ValueError, "no row has a positive"),
    (lambda q, k: sk.contrastive_loss(q[:0], k[:0]), ValueError, "N >= 1"),
    (lambda q, k: sk.contrastive_loss(q, "k"), TypeError, "k must be a torch.Tensor"),
    # no negative anywhere: the loss would be 0 with zero gradients
    (lambda q, k: sk.contrastive_loss(q[:1], k[:1]), ValueError, "no row has a negative: N = 1"),
    (lambda q, k: sk.contrastive_loss(q, groups=torch.zeros(6, dtype=torch.long)), ValueError,
     "no row has a negative: every row is in one group"),
    (lambda q, k: sk.contrastive_loss(q, k, groups=torch.zeros(6, dtype=torch.long)), ValueError,
     "no row has a negative: every row is in one group"),
    (lambda q, k: sk.contrastive_loss(q, k, groups=torch.zeros(6, dtype=torch.long), mine_k=1), ValueError,
     "no row has a negative"),
    (lambda q, k: sk.contrastive_loss(q, k, process_group="nccl"), TypeError,
     "process_group must be a torch.distributed ProcessGroup or None, got str"),
    (lambda q, k: sk.contrastive_loss(q, k, mine_k=True), ValueError, "mine_k must be an int"),
    (lambda q, k: sk.contrastive_loss(q, k, temperature=torch.tensor(0.05, requires_grad=True)), TypeError,
     "temperature must be a number, got a torch.Tensor that requires grad"),
    (lambda q, k: sk.contrastive_loss(q, k, temperature=torch.tensor([0.05, 0.1])), ValueError,
     "temperature must be a finite number or a 0-d real tensor"),
])
def test_bad_inputs(case, exc, match):
    q, k = _ok()
    with pytest.raises(exc, match=match):
        case(q, k)


def test_one_row_with_hard_negatives_is_fine():
    q, k = _ok()
    hn = torch.randn(1, 2, 4)
    loss = sk.contrastive_loss(q[:1], k[:1], hard_negatives=hn)
    torch.testing.assert_close(loss, contrastive_loss_reference(q[:1], k[:1], hard_negatives=hn))


def test_numpy_and_tensor_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    q, k = _ok()
    want, mined = sk.contrastive_loss(q, k, temperature=0.05, hardness=0.5, mine_k=2)
    for t, h, m in ((torch.tensor(0.05), torch.tensor(0.5), np.int64(2)),
                    (np.float32(0.05), np.float64(0.5), np.int32(2))):
        got, got_mined = sk.contrastive_loss(q, k, temperature=t, hardness=h, mine_k=m)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got_mined.indices, mined.indices)


# -- pooled_contrastive_loss -------------------------------------------------------------
# (float_mask, hard_negatives, symmetric, normalize): each loss option the fused op forwards
POOLED_CASES = [
    pytest.param(False, False, True, True, id="bool-mask"),
    pytest.param(True, False, True, True, id="float-mask"),
    pytest.param(True, True, True, True, id="hard-negatives"),
    pytest.param(False, True, False, True, id="hard-negatives-one-sided"),
    pytest.param(True, False, False, True, id="one-sided"),
    pytest.param(True, True, True, False, id="unnormalized"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("float_mask,hard,symmetric,normalize", POOLED_CASES)
def test_pooled_contrastive_loss_vs_reference(backend, float_mask, hard, symmetric, normalize):
    """Loss, mined indices and every gradient (tokens, float masks, hard negatives) against the
    fp64 composition masked_pool_reference -> contrastive_loss_reference.  The backward runs
    inside use_backend too, so the pooling backward of the backend under test is the one checked."""
    dev = _dev()
    gen = torch.Generator().manual_seed(11)
    n, lq, lk, d, h = 19, 7, 5, 24, 3
    scale = 1.0 if normalize else 0.3  # unnormalised pooled rows: keep the logits moderate
    xq = (scale * torch.randn(n, lq, d, generator=gen)).to(dev).requires_grad_()
    xk = (scale * torch.randn(n, lk, d, generator=gen)).to(dev).requires_grad_()
    mq = torch.rand(n, lq, generator=gen) > 0.4
    mk = torch.rand(n, lk, generator=gen) > 0.4
    mq[:, 0] = True
    mk[3] = False  # an empty mask pools to zeros
    if float_mask:
        mq = (mq.float() * torch.rand(n, lq, generator=gen)).to(dev).requires_grad_()
        mk = (mk.float() * torch.rand(n, lk, generator=gen)).to(dev).requires_grad_()
    else:
        mq, mk = mq.to(dev), mk.to(dev)
    hn = None
    if hard:
        hn = torch.nn.functional.normalize(torch.randn(n, h, d, generator=gen), dim=2).to(dev).requires_grad_()
    groups = (torch.arange(n) // 3).to(dev)
    kw = dict(groups=groups, temperature=0.1, hardness=0.5, symmetric=symmetric)
    inputs = [t for t in (xq, xk, mq, mk, hn) if t is not None and t.requires_grad]
    with sk.use_backend(backend):
        loss, mined = sk.pooled_contrastive_loss(xq, mq, xk, mk, mine_k=2, normalize=normalize,
                                                 hard_negatives=hn, **kw)
        got = torch.autograd.grad(loss, inputs)
    fq = masked_pool_reference(xq, mq, normalize=normalize, dtype=torch.float64)
    fk = masked_pool_reference(xk, mk, normalize=normalize, dtype=torch.float64)
    loss64, (idx, _) = contrastive_loss_reference(fq, fk, mine_k=2, hard_negatives=hn, dtype=torch.float64, **kw)
    ref = torch.autograd.grad(loss64, inputs)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    names = [nm for nm, t in (("xq", xq), ("xk", xk), ("mask_q", mq), ("mask_k", mk), ("hard_negatives", hn))
             if t is not None and t.requires_grad]
    for nm, a, b in zip(names, got, ref):
        assert a.shape == b.shape, nm
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5, msg=lambda m, nm=nm: f"{nm}: {m}")
    assert torch.equal(mined.indices.cpu(), idx.cpu())


def _pooled_op_args(float_mask, hard, both, mine_k, backend="torch", seed=0):
    gen = torch.Generator().manual_seed(seed)
    xq = torch.randn(7, 4, 5, generator=gen, requires_grad=True)
    xk = torch.randn(7, 3, 5, generator=gen, requires_grad=True)
    if float_mask:
        mq = torch.rand(7, 4, generator=gen).requires_grad_()
        mk = torch.rand(7, 3, generator=gen).requires_grad_()
    else:
        mq = torch.rand(7, 4, generator=gen) > 0.3
        mq[:, 0] = True
        mk = torch.ones(7, 3, dtype=torch.bool)
    hn = torch.randn(7, 2, 5, generator=gen, requires_grad=True) if hard else None
    g = torch.arange(7) // 2
    return (xq, mq, xk, mk, hn, g, True, 1e-6, 0.2, 0.5 if hard else 0.0, both, mine_k, backend)


@pytest.mark.parametrize("float_mask, hard, both, mine_k", [(True, True, True, 2), (False, False, False, 0)])
def test_pooled_opcheck(float_mask, hard, both, mine_k):
    """solar::pooled_contrastive_fwd / _bwd are one op each for torch.library (schema, fake
    kernel, autograd registration, AOT dispatch with dynamic shapes)."""
    args = _pooled_op_args(float_mask, hard, both, mine_k)
    torch.library.opcheck(torch.ops.solar.pooled_contrastive_fwd.default, args)
    out = torch.ops.solar.pooled_contrastive_fwd(*args)
    xq, mq, xk, mk, hn, g = args[:6]
    row_loss, col_loss, _, _, fq, aux_q, fk, aux_k, rs, cs = (t.detach() for t in out)
    need = (True, float_mask, True, float_mask)
    bargs = (torch.ones_like(row_loss), torch.ones_like(col_loss), xq.detach(),
             mq.detach() if float_mask else mq, xk.detach(), mk.detach() if float_mask else mk,
             hn.detach() if hard else None, g, fq, aux_q, fk, aux_k, rs, cs, True, 1e-6, 0.2, args[9], both,
             "torch", *need)
    torch.library.opcheck(torch.ops.solar.pooled_contrastive_bwd.default, bargs)


def test_pooled_op_gradients_match_the_public_function():
    """The op's registered autograd gives the gradients of pooled_contrastive_loss (which calls
    it) and of masked_pool + contrastive_loss composed."""
    args = _pooled_op_args(True, True, True, 0)
    xq, mq, xk, mk, hn, g = args[:6]
    loss = sk.pooled_contrastive_loss(xq, mq, xk, mk, groups=g, hard_negatives=hn, temperature=0.2, hardness=0.5)
    got = torch.autograd.grad(loss, (xq, mq, xk, mk, hn))
    fq = sk.masked_pool(xq, mq, normalize=True)
    fk = sk.masked_pool(xk, mk, normalize=True)
    ref_loss = sk.contrastive_loss(fq, fk, groups=g, hard_negatives=hn, temperature=0.2, hardness=0.5)
    ref = torch.autograd.grad(ref_loss, (xq, mq, xk, mk, hn))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pooled_op_compiles_as_one_node():
    """torch.compile(fullgraph=True) traces the op and its backward without a graph break."""
    args = _pooled_op_args(True, False, True, 0)
    xq, mq, xk, mk, hn, g = args[:6]
    rest = args[6:]

    def f(xq, mq, xk, mk):
        row_loss, col_loss = torch.ops.solar.pooled_contrastive_fwd(xq, mq, xk, mk, hn, g, *rest)[:2]
        return 0.5 * row_loss.mean() + 0.5 * col_loss.mean()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(xq, mq, xk, mk)
    ref = f(xq, mq, xk, mk)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, (xq, mq, xk, mk))
    want = torch.autograd.grad(ref, (xq, mq, xk, mk))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_pooled_bad_inputs():
    x = torch.randn(4, 3, 8)
    m = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="agree on N and D"):
        sk.pooled_contrastive_loss(x, m, torch.randn(5, 3, 8), torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        sk.pooled_contrastive_loss(x, m, x, m, temperature=0)
    with pytest.raises(ValueError, match="mask"):
        sk.pooled_contrastive_loss(x, m[:, :2], x, m)
    with pytest.raises(ValueError, match="non-finite"):
        sk.pooled_contrastive_loss(x.clone().fill_(float("nan")), m, x, m)


def _pooled_bad_cases():
    xq, xk = torch.randn(6, 5, 4), torch.randn(6, 3, 4)
    mq, mk = torch.ones(6, 5), torch.ones(6, 3)
    mq_pad = mq.clone()
    mq_pad[:, 4] = 0
    xq_nan_pad = xq.clone()
    xq_nan_pad[0, 4, 0] = float("nan")  # masked out, still refused
    nan, meta = float("nan"), "meta"
    return [
        ("mask_q shape", (xq, mq[:, :2], xk, mk), {}, ValueError, r"mask_q must have shape .* xq .* got mask_q"),
        ("mask_k shape", (xq, mq, xk, mk[:5]), {}, ValueError, r"mask_k must have shape .* xk"),
        ("N = 0", (xq[:0], mq[:0], xk[:0], mk[:0]), {}, ValueError, r"xq must have N >= 1 rows"),
        ("mask_q device", (xq, mq.to(meta), xk, mk), {}, ValueError, "xq on cpu, mask_q on meta"),
        ("xk device", (xq, mq, xk.to(meta), mk.to(meta)), {}, ValueError, "xq on cpu, xk on meta"),
        ("groups", (xq, mq, xk, mk), dict(groups=torch.arange(5)), ValueError, r"\(rows of xq\)"),
        ("hard_negatives list", (xq, mq, xk, mk), dict(hard_negatives=[1]), TypeError,
         "hard_negatives must be a torch.Tensor, got list"),
        ("hard_negatives dtype", (xq, mq, xk, mk), dict(hard_negatives=torch.randn(6, 2, 4).half()), TypeError,
         "hard_negatives must have xq's dtype float32, got float16"),
        ("xk dtype", (xq, mq, xk.half(), mk), {}, TypeError, "xk must have xq's dtype float32, got float16"),
        ("NaN mask_q", (xq, torch.full((6, 5), nan), xk, mk), {}, ValueError, "mask_q has 30 non-finite"),
        ("inf mask_k", (xq, mq, xk, mk.clone().fill_(float("inf"))), {}, ValueError, "mask_k has 18 non-finite"),
        ("negative mask_k", (xq, mq, xk, -mk), {}, ValueError, "mask_k must hold non-negative"),
        ("NaN xq under a zero weight", (xq_nan_pad, mq_pad, xk, mk), {}, ValueError, "xq has 1 non-finite"),
        ("N = 1", (xq[:1], mq[:1], xk[:1], mk[:1]), {}, ValueError, "no row has a negative"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _pooled_bad_cases(), ids=lambda c: c[0])
def test_pooled_bad_inputs_name_the_arguments(backend, case):
    _, args, kw, exc, match = case
    with sk.use_backend(backend):
        with pytest.raises(exc, match=match):
            sk.pooled_contrastive_loss(*args, **kw)


def test_modules():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(10, 8, generator=gen)
    k = torch.randn(10, 8, generator=gen)
    mod = snn.ContrastiveLoss(temperature=0.2, hardness=0.3)
    torch.testing.assert_close(mod(q, k), sk.contrastive_loss(q, k, temperature=0.2, hardness=0.3))
    assert "hardness=0.3" in repr(mod)
    x = torch.randn(10, 4, 8, generator=gen)
    m = torch.ones(10, 4, dtype=torch.bool)
    pm = snn.PooledContrastiveLoss(temperature=0.2)
    torch.testing.assert_close(pm(x, m, x, m), sk.pooled_contrastive_loss(x, m, x, m, temperature=0.2))


def test_info_lists_the_op():
    from solar_kernels import _dispatch

    assert "contrastive_loss" in _dispatch.OPS
    assert cl.Mined._fields == ("indices", "scores")
