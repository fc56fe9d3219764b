"""Exact conversion between :class:`solar_kernels.Index` and FAISS indexes.

Only the storage formats that hold the very same numbers on both sides are converted, so that
a converted index returns the same neighbours:

============================  =====================================================
solar_kernels.Index           FAISS
============================  =====================================================
dtype "fp32", metric "ip"     ``IndexFlatIP``
dtype "fp16", metric "ip"     ``IndexScalarQuantizer(d, QT_fp16, METRIC_INNER_PRODUCT)``
============================  =====================================================

An "int8" index has no exact FAISS twin (FAISS's 8-bit scalar quantiser trains one range per
dimension; ours keeps one scale per row) and is refused, as are FAISS indexes of any other
type or metric (L2, IVF, HNSW, PQ, ID maps): their vectors or ids are not the plain rows 0..n-1.
A user who outgrows exact search converts with ``to_faiss`` (or reads ``reconstruct()``) and
builds the approximate FAISS index from the same vectors.

FAISS is an optional dependency (``pip install faiss-cpu``); it is imported when a function
here is called.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_faiss", "from_faiss"]

_CHUNK = 1 << 16   # rows copied per step, so a conversion never holds a second full fp32 copy


def _faiss():
    try:
        import faiss
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise ImportError("FAISS interop needs the faiss package: pip install faiss-cpu") from e
    return faiss


def to_faiss(index):
    """A FAISS index holding exactly the vectors of `index` (a solar_kernels.Index), ids 0..n-1.

    fp32 -> ``faiss.IndexFlatIP``; fp16 -> ``faiss.IndexScalarQuantizer`` with ``QT_fp16`` and
    inner product (each stored half value is re-encoded to the same half value).  A CUDA index
    is copied to CPU.  ValueError for an int8 index (no exact FAISS format).
    """
    # duck-typed: solar_kernels.search imports this module (Index.to_faiss), not the reverse
    if not all(hasattr(index, a) for a in ("metric", "dtype", "dim", "reconstruct")):
        raise TypeError(f"index must be a solar_kernels.Index, got {type(index).__name__}")
    if index.metric != "ip":
        raise ValueError(f"index.metric must be 'ip' to map onto FAISS, got {index.metric!r}")
    faiss = _faiss()
    d = index.dim
    if index.dtype == "fp32":
        out = faiss.IndexFlatIP(d)
    elif index.dtype == "fp16":
        out = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"index.dtype {index.dtype!r} has no exact FAISS format (FAISS's 8-bit quantiser is per "
                         f"dimension, ours per row); expected 'fp32' or 'fp16' (convert the vectors with "
                         f"index.reconstruct() if an approximate copy is acceptable)")
    for a in range(0, len(index), _CHUNK):
        ids = torch.arange(a, min(a + _CHUNK, len(index)))
        out.add(np.ascontiguousarray(index.reconstruct(ids).cpu().numpy(), dtype=np.float32))
    return out


def from_faiss(faiss_index, index_cls, device="cpu"):
    """An `index_cls` (solar_kernels.Index: call it as ``Index.from_faiss(faiss_index)``) holding
    exactly the vectors of a FAISS ``IndexFlatIP`` (-> "fp32") or an inner-product
    ``IndexScalarQuantizer`` with ``QT_fp16`` (-> "fp16"), ids 0..n-1 as in FAISS.

    ValueError names the FAISS type, metric or quantiser that has no exact counterpart.
    """

    faiss = _faiss()
    if not isinstance(faiss_index, faiss.Index):
        raise TypeError(f"faiss_index must be a faiss.Index, got {type(faiss_index).__name__}")
    idx = faiss.downcast_index(faiss_index)
    kind = type(idx).__name__
    if idx.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"faiss_index must use METRIC_INNER_PRODUCT (solar_kernels.Index ranks by inner "
                         f"product), got a {kind} with metric type {idx.metric_type}")
    if type(idx) is faiss.IndexFlatIP or (type(idx) is faiss.IndexFlat and kind == "IndexFlat"):
        dtype = "fp32"
    elif type(idx) is faiss.IndexScalarQuantizer:
        if idx.sq.qtype != faiss.ScalarQuantizer.QT_fp16:
            raise ValueError(f"faiss_index: an IndexScalarQuantizer maps exactly only with QT_fp16, got qtype "
                             f"{idx.sq.qtype}")
        dtype = "fp16"
    else:
        raise ValueError(f"faiss_index: a {kind} has no exact solar_kernels.Index format; expected IndexFlatIP "
                         f"or IndexScalarQuantizer(QT_fp16, inner product)")
    out = index_cls(idx.d, dtype=dtype, device="cpu")
    for a in range(0, idx.ntotal, _CHUNK):
        out.add(torch.from_numpy(idx.reconstruct_n(a, min(_CHUNK, idx.ntotal - a))))
    return out.to(device) if str(device) != "cpu" else out
