"""Index.to_faiss / Index.from_faiss: exact round trips for fp32 <-> IndexFlatIP and
fp16 <-> IndexScalarQuantizer(QT_fp16); other formats are refused by name."""
import pytest
import torch

import solar_kernels as sk

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (it is in the 'bench' and 'faiss' extras)")

DIM, N, M, K = 24, 300, 17, 10


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(N, DIM, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(M, DIM, generator=g), dim=1)
    return x, q


@pytest.mark.parametrize("dtype,kind", [("fp32", "IndexFlatIP"), ("fp16", "IndexScalarQuantizer")])
def test_round_trip_gives_identical_search_results(dtype, kind):
    x, q = _data()
    ours = sk.Index(DIM, dtype=dtype)
    ours.add(x)
    fi = ours.to_faiss()
    assert type(faiss.downcast_index(fi)).__name__ == kind and fi.ntotal == N
    s_ours, i_ours = ours.search(q, K)
    s_f, i_f = fi.search(q.numpy(), K)
    assert torch.equal(i_ours, torch.from_numpy(i_f))
    torch.testing.assert_close(s_ours, torch.from_numpy(s_f), rtol=0, atol=1e-5)
    back = sk.Index.from_faiss(fi)
    assert back.dtype == dtype and len(back) == N
    assert torch.equal(back.reconstruct(), ours.reconstruct())     # bit for bit
    s_b, i_b = back.search(q, K)
    assert torch.equal(i_b, i_ours) and torch.equal(s_b, s_ours)


def test_from_a_faiss_built_index():
    x, q = _data(1)
    fi = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    fi.add(x.numpy())
    ours = sk.Index.from_faiss(fi)
    assert ours.dtype == "fp16"
    assert torch.equal(ours.reconstruct(), torch.from_numpy(fi.reconstruct_n(0, N)))
    assert torch.equal(ours.search(q, K)[1], torch.from_numpy(fi.search(q.numpy(), K)[1]))


def test_formats_without_an_exact_twin_are_refused():
    x, _ = _data()
    i8 = sk.Index(DIM, dtype="int8")
    i8.add(x)
    with pytest.raises(ValueError, match="int8.*no exact FAISS format"):
        i8.to_faiss()
    with pytest.raises(ValueError, match="METRIC_INNER_PRODUCT"):
        sk.Index.from_faiss(faiss.IndexFlatL2(DIM))
    with pytest.raises(ValueError, match="QT_fp16"):
        sk.Index.from_faiss(faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT))
    with pytest.raises(ValueError, match="IndexHNSWFlat has no exact"):
        sk.Index.from_faiss(faiss.IndexHNSWFlat(DIM, 8, faiss.METRIC_INNER_PRODUCT))
    with pytest.raises(TypeError, match="faiss_index must be a faiss.Index"):
        sk.Index.from_faiss(x)
