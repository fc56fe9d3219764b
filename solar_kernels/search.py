"""Exact top-k inner-product search over compact embeddings.

SOLAR embeds every (image, text) pair in one compact vector; this module serves the
benchmark's search over a large pool and the offline mining of hard negatives.

    index = Index(768, dtype="int8")          # "fp32" | "fp16" | "int8", metric "ip"
    index.add(embeddings)                     # ids 0.. in insertion order
    scores, ids = index.search(queries, k=10) # [m, k] float32, [m, k] int64, best first
    index.save("pool.idx"); index = Index.load("pool.idx", mmap=True)
    scores, ids = topk_search(queries, db, k) # one-shot, fp32

Exactness
  * fp32: exact inner products; ties are broken by the lower id (so identical rows are
    returned in insertion order).
  * fp16: rows stored in half precision, queries kept in fp32, fp32 accumulation.
  * int8: per-row symmetric scale s = max|x| / 127 stored with the codes
    c = round(x / s) in [-127, 127]; queries are quantised the same way, dot products are
    exact integer sums, and the score is float(dot) * (s_row * s_query).  The result is
    the exact top-k under those quantised scores (see `reference.topk_search_reference`).
    The kernels accumulate those sums in int32, so an int8 index takes dim <= INT8_MAX_DIM
    (66311); a larger dim is refused at construction (see `INT8_MAX_DIM`).

Backends
  CPU: C++/OpenMP (csrc/search) with SIMD micro-kernels chosen at run time from the CPU's
  features: AVX-512 (fp32/fp16 FMA tiles, int8 VNNI), AVX2+FMA+F16C (int8 by the sign
  trick), and a scalar fallback.  `simd=` or the SOLAR_SEARCH_SIMD environment variable
  (0/scalar, 1/avx2, 2/avx512, -1/auto) forces a level; it is clamped to what the CPU has.
  CUDA: a fused kernel (csrc/search/search_cuda.cu) that scores tiles and keeps each
  query's top-k in shared memory; k <= 1024; no score matrix in device memory.

Sharded search: `index.search(q, k, process_group=pg)` on every rank of a
torch.distributed group, each rank holding one shard; ids are global (shard offsets
follow rank order) and the global top-k is merged on every rank.

File format (little-endian; `Index.save` / `Index.load`), no pickle:

    offset  size  field
    0       8     magic b"SOLARIDX"
    8       4     format version (uint32, currently 1)
    12      4     dtype code (uint32: 0 fp32, 1 fp16, 2 int8)
    16      4     metric code (uint32: 0 inner product)
    20      4     reserved, zero
    24      8     dim (uint64)
    32      8     count: number of vectors (uint64)
    40      8     payload size in bytes (uint64)
    48      4     CRC-32 (zlib) of the payload
    52      4     CRC-32 (zlib) of bytes [0, 52) of this header
    56      8     reserved, zero
    64      ...   payload: rows [count, dim] in the storage dtype (fp32, IEEE fp16 or
                  int8 codes), zero-padded to a multiple of 64 bytes; for int8 then the
                  scales float32 [count] and the code sums int32 [count].

Files and memory maps
  `save` never writes into an existing file: it writes a new file next to `path` and
  renames it over `path` (atomic on POSIX), so a reader sees the old index or the new one,
  never a mix, and a failed save leaves the old file as it was.  An index loaded with
  `load(path, mmap=True)` reads its rows from the file for as long as it lives: saving to
  that same path is safe (the mapping keeps the old file's data), but another program
  that truncates the file kills this process with SIGBUS on the next search, and one that
  rewrites it in place changes its results without any error.  Replace index files only by
  renaming a new file over them (as `save` does), or load without mmap.
"""
from __future__ import annotations

import os
import re
import struct
import uuid
import zlib
from typing import Optional, Tuple, Union

import numpy as np
import torch

from . import _dispatch, _ext
from ._checks import check_finite
from ._topk import merge_topk

__all__ = ["Index", "topk_search", "quantize_int8", "IndexFileError", "simd_level", "kernel_name", "INT8_MAX_DIM"]

DTYPES = ("fp32", "fp16", "int8")
METRICS = ("ip",)
_DTYPE_CODE = {"fp32": 0, "fp16": 1, "int8": 2}
_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
_MAGIC = b"SOLARIDX"
_VERSION = 1
_HEADER = struct.Struct("<8sIIII QQQ II Q")  # 64 bytes
assert _HEADER.size == 64
_ALIGN = 64
_STRATEGIES = {"auto": -1, "split_queries": 0, "split_rows": 1}
_SIMD_NAMES = {"-1": -1, "auto": -1, "0": 0, "scalar": 0, "1": 1, "avx2": 1, "2": 2, "avx512": 2}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The int8 kernels sum code products in int32.  Scalar, AVX2 (sign trick) and CUDA (dp4a)
# accumulate sum(q * x) with |q|, |x| <= 127: 127 * 127 * d must fit, d <= 133144; beyond
# that the scores wrap around and the ranking is silently wrong.  The AVX-512 VNNI kernels
# accumulate sum((q + 128) * x) (u8 x s8) and subtract 128 * sum(x) afterwards: their
# accumulator holds up to 255 * 127 * d, which fits for d <= 66311; above, they would be
# exact only through two's-complement wrap-around (one of the subtractions is scalar C++,
# where signed overflow is undefined).  So int8 indexes are refused above 66311.
INT8_MAX_DIM = (2**31 - 1) // (255 * 127)

_dispatch.register_op(
    "topk_search",
    cuda="CUDA fused top-k kernel (csrc/search/search_cuda.cu)",
    cpu_symbol="search_topk_cpu",
    cpu_fallback="none (needs the native extension)",
)


class IndexFileError(ValueError):
    """An index file is not a SOLAR index, has an unsupported version, or is truncated/corrupt."""


def simd_level(simd: Union[int, str, None] = None) -> int:
    """The SIMD level a CPU search runs at: 0 scalar, 1 AVX2, 2 AVX-512 (VNNI for int8).

    `simd=None` reads SOLAR_SEARCH_SIMD (default: the best the CPU supports); a level the
    CPU lacks is clamped down to one it has.
    """
    return int(_ext.require("search_simd_level")(_simd_request(simd)))


def kernel_name(dtype: str, m: int, simd: Union[int, str, None] = None) -> str:
    """Name of the CPU micro-kernel that would score `m` queries against a `dtype` index."""
    _check_dtype_name(dtype)
    return _ext.require("search_kernel_name")(_DTYPE_CODE[dtype], _simd_request(simd), int(m))


def _simd_request(simd) -> int:
    if simd is None:
        simd = os.environ.get("SOLAR_SEARCH_SIMD", "-1")
    key = str(simd).strip().lower()
    if key not in _SIMD_NAMES:
        raise ValueError(f"simd must be one of -1/auto, 0/scalar, 1/avx2, 2/avx512, got {simd!r}")
    return _SIMD_NAMES[key]


def _check_dtype_name(dtype) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantisation: scale = max|x| / 127, codes = round(x / scale).

    x: [n, d] float32.  Returns (codes int8 [n, d] in [-127, 127], scales float32 [n]).
    An all-zero row gets scale 0 and zero codes.
    """
    x = x.to(torch.float32)
    if x.device.type == "cpu" and x.dim() == 2 and _ext.available("quantize_int8_cpu"):
        codes, scale = _ext.require("quantize_int8_cpu")(x.contiguous())  # one native pass, same values
        return codes, scale
    scale = x.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / safe[:, None]).clamp_(-127, 127)
    codes = torch.where(scale[:, None] > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int8), scale.contiguous()


def _as_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {str(x.dtype).replace('torch.', '')}"
        )
    return x


def _as_matrix(name: str, x, dim: int, device: torch.device, home: str = "the index") -> torch.Tensor:
    """Validate `x` as [m, dim] floats on `device` (where `home` lives); return it as contiguous float32."""
    x = _as_tensor(name, x)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape [m, {dim}] (or [{dim}]), got {tuple(x.shape)}")
    if x.device.type != device.type:
        raise ValueError(f"{name} is on {x.device} but {home} lives on {device}; move it with .to('{device}')")
    check_finite(name, x)
    return x.to(torch.float32).contiguous()


def _as_ids(ids) -> torch.Tensor:
    """Row ids (tensor, ndarray or sequence of ints) as int64; bool masks and floats are refused."""
    try:
        t = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"ids must be integers (a tensor, ndarray or sequence of ints), got {type(ids).__name__}") \
            from None
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        hint = "; for a bool mask pass mask.nonzero()[:, 0]" if t.dtype == torch.bool else ""
        raise TypeError(f"ids must be integers (a tensor, ndarray or sequence of ints), got "
                        f"{str(t.dtype).replace('torch.', '')} values{hint}")
    return t.to(torch.int64)


def _check_k(k, n: int, rows: str = "index") -> int:
    """k as an int in [1, n]; `rows` names what holds the n vectors ("index" or "db")."""
    is_int_tensor = (isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point()
                     and not k.is_complex() and k.dtype != torch.bool)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) and not is_int_tensor:
        what = f"a {str(k.dtype).replace('torch.', '')} tensor" if isinstance(k, torch.Tensor) else type(k).__name__
        raise TypeError(f"k must be an int, got {what}")
    k = int(k)
    if n == 0:
        if rows == "db":
            raise ValueError("db is empty (0 rows): there is nothing to search")
        raise ValueError("the index is empty: add vectors before searching")
    if k < 1 or k > n:
        where = "the rows of db" if rows == "db" else "the number of indexed vectors"
        raise ValueError(f"k must be in [1, {n}] ({where}), got {k}")
    return k


def _parse_device(device) -> torch.device:
    """`device` as a cpu or cuda torch.device; raises naming the argument otherwise."""
    want = "device must be 'cpu', 'cuda' or 'cuda:N' (or a torch.device)"
    if isinstance(device, str):
        m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device)
        if m is None:
            raise ValueError(f"{want}, got {device!r}")
        device = torch.device(device)
    elif not isinstance(device, torch.device):
        raise TypeError(f"{want}, got {type(device).__name__} {device!r}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{want}, got {str(device)!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} needs CUDA, but torch.cuda.is_available() is False "
                               f"(a CPU-only torch build, or no visible GPU)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r} does not exist: {count} CUDA device(s) are visible")
    return device


def _run_search(q32, data, scales, sums, dtype: str, k: int, simd, strategy, num_threads):
    """Dispatch one search to the CPU or CUDA kernel.  q32: float32 [m, d] on data's device."""
    if dtype == "int8":
        qc, qs = quantize_int8(q32)
    else:
        qc, qs = q32, None
    if data.device.type == "cuda":
        fn = _ext.require("search_topk_cuda")
        return fn(qc, qs, data, scales, k)
    if data.device.type != "cpu":
        raise ValueError(f"search runs on CPU or CUDA tensors, got {data.device}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {tuple(_STRATEGIES)}, got {strategy!r}")
    fn = _ext.require("search_topk_cpu")
    nt = 0 if num_threads is None else int(num_threads)
    with torch.no_grad():
        s, i = fn(qc, qs, data, scales, sums, k, _simd_request(simd), _STRATEGIES[strategy], nt)
    return s, i


def _check_fp16_range(name: str, x: torch.Tensor) -> None:
    """x (finite float32) must fit float16: a larger value would be stored as inf."""
    top = float(torch.finfo(torch.float16).max)
    big = float(x.abs().amax()) if x.numel() else 0.0
    if big > top:
        bad = int((x.abs() > top).sum())
        raise ValueError(f"{name} has {bad} value(s) beyond float16's range (|{name}| > {top:g}, largest {big:.6g}) "
                         f"that an fp16 index cannot store (they would become inf): use dtype='fp32' or rescale "
                         f"the vectors (e.g. L2-normalise them)")


class Index:
    """Exact inner-product index over fp32, fp16 or int8 rows (ids 0.. in insertion order).

    Args:
        dim: vector dimension.
        dtype: storage, "fp32" (exact), "fp16" (half rows, fp32 accumulation) or "int8"
            (per-row symmetric scale, integer dot products).
        metric: "ip" (inner product; L2-normalise the vectors for cosine similarity).
        device: "cpu", "cuda" or "cuda:N", or a torch.device of those types (CUDA needs a
            visible GPU and the extension built with CUDA).
    """

    def __init__(self, dim: int, dtype: str = "fp32", metric: str = "ip", device: Union[str, torch.device] = "cpu"):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        _check_dtype_name(dtype)
        if dtype == "int8" and int(dim) > INT8_MAX_DIM:
            raise ValueError(f"dim must be <= {INT8_MAX_DIM} for dtype='int8' (the int8 kernels accumulate "
                             f"255 * 127 * dim in int32, which overflows beyond that), got {int(dim)}; use "
                             f"dtype='fp16' or 'fp32' for wider vectors")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        device = _parse_device(device)
        if device.type == "cuda" and not _ext.available("search_topk_cuda"):
            raise RuntimeError(
                "a CUDA index needs the native extension built with CUDA (search_topk_cuda is missing: "
                f"{'extension not loaded: ' + str(_ext.load_error) if not _ext.available() else 'built CPU-only'})"
            )
        self._dim, self._dtype, self._metric, self._device = int(dim), dtype, metric, device
        self._n = 0
        self._rows = torch.empty(0, self._dim, dtype=_STORAGE[dtype], device=device)
        self._scales = torch.empty(0, dtype=torch.float32, device=device)
        self._sums = torch.empty(0, dtype=torch.int32, device=device)
        self._mmap = None  # keeps a numpy memmap alive while rows view it

    # ---- properties -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._dim

    @property
    def dtype(self) -> str:
        """Storage dtype name: "fp32", "fp16" or "int8"."""
        return self._dtype

    @property
    def metric(self) -> str:
        """Similarity: "ip" (inner product)."""
        return self._metric

    @property
    def device(self) -> torch.device:
        """Where the rows live."""
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes held for the stored vectors: rows, plus the int8 scales and code sums."""
        n = self._n
        per = self._dim * torch.tensor([], dtype=_STORAGE[self._dtype]).element_size()
        extra = 8 if self._dtype == "int8" else 0
        return n * (per + extra)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"Index(dim={self._dim}, dtype={self._dtype!r}, metric={self._metric!r}, n={self._n}, device={self._device})"

    # ---- storage ----------------------------------------------------------------------
    def _rows_view(self):
        return self._rows[: self._n], self._scales[: self._n], self._sums[: self._n]

    def _reserve(self, total: int) -> None:
        cap = self._rows.shape[0]
        if total <= cap and self._mmap is None:
            return
        new_cap = max(total, 2 * cap, 1024) if self._mmap is None else max(total, 1024)
        rows = torch.empty(new_cap, self._dim, dtype=self._rows.dtype, device=self._device)
        rows[: self._n].copy_(self._rows[: self._n])
        scales = torch.empty(new_cap, dtype=torch.float32, device=self._device)
        sums = torch.empty(new_cap, dtype=torch.int32, device=self._device)
        if self._dtype == "int8":
            scales[: self._n].copy_(self._scales[: self._n])
            sums[: self._n].copy_(self._sums[: self._n])
        self._rows, self._scales, self._sums, self._mmap = rows, scales, sums, None

    def reserve(self, n: int) -> None:
        """Allocate room for `n` vectors in all, so that adding them in chunks never copies
        the rows into a larger buffer (growth otherwise doubles the capacity: up to twice the
        memory of the rows while they are added, and up to half of it left unused)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        self._reserve(int(n))

    def add(self, x) -> torch.Tensor:
        """Append vectors x [n, dim] (tensor or ndarray, any float dtype); returns their ids.

        Raises ValueError for NaN/inf, and in an fp16 index for |x| > 65504 (float16's range).
        """
        x = _as_matrix("x", x, self._dim, self._device)
        n = x.shape[0]
        start = self._n
        if n == 0:
            return torch.arange(start, start, dtype=torch.int64)
        self._reserve(start + n)
        with torch.no_grad():
            if self._dtype == "int8":
                codes, scales = quantize_int8(x)
                self._rows[start : start + n].copy_(codes)
                self._scales[start : start + n].copy_(scales)
                self._sums[start : start + n].copy_(codes.sum(dim=1, dtype=torch.int32))
            else:
                if self._dtype == "fp16":
                    _check_fp16_range("x", x)
                self._rows[start : start + n].copy_(x.to(_STORAGE[self._dtype]))
        self._n = start + n
        return torch.arange(start, start + n, dtype=torch.int64)

    def reconstruct(self, ids=None) -> torch.Tensor:
        """The stored vectors (decoded to float32) for `ids` (default: all), [len(ids), dim].

        ids: integer row ids (int tensor, ndarray or sequence of ints) in [0, len(index));
        TypeError for bool masks or floats, IndexError for ids out of range.
        """
        rows, scales, _ = self._rows_view()
        if ids is not None:
            ids = _as_ids(ids).to(self._device)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self._n):
                raise IndexError(f"ids must be in [0, {self._n}), got range [{int(ids.min())}, {int(ids.max())}]")
            rows = rows[ids]
        if self._dtype == "int8":
            # only int8 indexes keep per-row scales (a loaded fp32 / fp16 index has none at all)
            return rows.to(torch.float32) * (scales if ids is None else scales[ids])[:, None]
        return rows.to(torch.float32)

    # ---- search -----------------------------------------------------------------------
    def search(self, q, k: int, *, simd=None, strategy: str = "auto", num_threads: Optional[int] = None,
               process_group=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k rows by inner product with each query, best first (ties: lower id first).

        Args:
            q: queries [m, dim] (or [dim]), float tensor/ndarray on the index's device.
            k: results per query, 1 <= k <= len(index) (the global size when sharded).
            simd: CPU SIMD level (None: SOLAR_SEARCH_SIMD or the best; 0 scalar, 1 AVX2, 2 AVX-512).
            strategy: CPU work split, "auto", "split_queries" (each thread owns queries) or
                "split_rows" (rows split across threads, per-thread top-k merged).
            num_threads: CPU threads (default: torch.get_num_threads()).
            process_group: a torch.distributed group whose every rank holds one shard and
                calls search with the same queries; ids are then global (rank-order offsets).
        Returns:
            scores float32 [m, k], ids int64 [m, k].
        """
        if process_group is not None:
            return self._search_sharded(q, k, process_group, simd=simd, strategy=strategy, num_threads=num_threads)
        k = _check_k(k, self._n)
        q32 = _as_matrix("q", q, self._dim, self._device)
        rows, scales, sums = self._rows_view()
        if self._dtype != "int8":
            scales = sums = None
        if q32.shape[0] == 0:
            return (torch.empty(0, k, dtype=torch.float32, device=self._device),
                    torch.empty(0, k, dtype=torch.int64, device=self._device))
        return _run_search(q32, rows, scales, sums, self._dtype, k, simd, strategy, num_threads)

    def _search_sharded(self, q, k, group, **kw):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group given but torch.distributed is not initialised")
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        dev = self._device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([self._n], dtype=torch.int64, device=dev), group=group)
        sizes = [int(s.item()) for s in sizes]
        total = sum(sizes)
        k = _check_k(k, total)
        q32 = _as_matrix("q", q, self._dim, self._device)
        m = q32.shape[0]
        k_local = min(k, self._n)
        scores = torch.full((m, k), float("-inf"), dtype=torch.float32, device=self._device)
        ids = torch.full((m, k), -1, dtype=torch.int64, device=self._device)
        if k_local > 0 and m > 0:
            s, i = self.search(q32, k_local, **kw)
            scores[:, :k_local] = s
            ids[:, :k_local] = i + sum(sizes[:rank])
        all_s = [torch.empty(m, k, dtype=torch.float32, device=dev) for _ in range(world)]
        all_i = [torch.empty(m, k, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(all_s, scores.to(dev), group=group)
        dist.all_gather(all_i, ids.to(dev), group=group)
        return merge_topk(torch.cat(all_s, dim=1), torch.cat(all_i, dim=1), k)

    # ---- persistence ------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the index to `path` in the documented binary format (see the module doc).

        The bytes go to a new temporary file in the same folder, flushed to disk, which is
        then renamed over `path`: an existing file is never written in place (an index
        memory-mapped from it keeps its data), and on any error the temporary file is
        removed and `path` is left as it was."""
        rows, scales, sums = (t.cpu() for t in self._rows_view())
        parts = [rows.contiguous().numpy().view(np.uint8).reshape(-1)]
        pad = (-parts[0].nbytes) % _ALIGN
        parts.append(np.zeros(pad, dtype=np.uint8))
        if self._dtype == "int8":
            parts.append(scales.contiguous().numpy().view(np.uint8))
            parts.append(sums.contiguous().numpy().view(np.uint8))
        payload = sum(p.nbytes for p in parts)
        crc = 0
        for p in parts:
            crc = zlib.crc32(memoryview(p), crc)
        head = _pack_header(self._dtype, self._dim, self._n, payload, crc)
        path = os.fspath(path)
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"  # unique: concurrent saves never share one
        try:
            with open(tmp, "xb") as f:
                f.write(head)
                for p in parts:
                    f.write(memoryview(p))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike], mmap: bool = False, *, verify: bool = True,
             device: Union[str, torch.device] = "cpu") -> "Index":
        """Read an index written by `save`.

        mmap=True maps the rows from the file (copy-on-write, nothing is read until used;
        `add` then copies them into memory).  The file must then stay as it is while the
        index is used: truncating it makes the next search die with SIGBUS, rewriting it in
        place changes results silently (see "Files and memory maps" in the module doc;
        `save` renames a new file over the path, which is safe).
        verify=True checks the payload CRC-32.
        Raises IndexFileError on a foreign, truncated or corrupt file.
        """
        device = _parse_device(device)
        path = os.fspath(path)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
        dtype, dim, count, payload, crc = _unpack_header(head, path)
        if size < _HEADER.size + payload:
            raise IndexFileError(f"{path}: truncated: {size} bytes, the header announces {_HEADER.size + payload}")
        elem = torch.tensor([], dtype=_STORAGE[dtype]).element_size()
        rows_bytes = count * dim * elem
        rows_padded = rows_bytes + (-rows_bytes) % _ALIGN
        expect = rows_padded + (8 * count if dtype == "int8" else 0)
        if payload != expect:
            raise IndexFileError(f"{path}: corrupt header: payload is {payload} bytes, {expect} expected for "
                                 f"{count} x {dim} {dtype}")
        np_dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[dtype]
        if mmap and payload > 0:
            raw = np.memmap(path, dtype=np.uint8, mode="c", offset=_HEADER.size, shape=(payload,))
        else:
            raw = np.fromfile(path, dtype=np.uint8, count=payload, offset=_HEADER.size)
            if raw.nbytes != payload:
                raise IndexFileError(f"{path}: truncated payload")
        if verify and zlib.crc32(memoryview(raw)) != crc:
            raise IndexFileError(f"{path}: checksum mismatch: the payload is corrupt")
        if dtype == "int8" and dim > INT8_MAX_DIM:
            raise IndexFileError(f"{path}: an int8 index of dim {dim} (at most {INT8_MAX_DIM} is supported: the "
                                 f"int8 kernels accumulate in int32)")
        index = cls(dim, dtype=dtype, metric="ip")
        rows = torch.from_numpy(raw[:rows_bytes].view(np_dtype).reshape(count, dim)) if count else index._rows
        if dtype == "int8" and count:
            index._scales = torch.from_numpy(raw[rows_padded : rows_padded + 4 * count].view(np.float32))
            index._sums = torch.from_numpy(raw[rows_padded + 4 * count : rows_padded + 8 * count].view(np.int32))
            if verify and int(rows.min()) < -127:
                raise IndexFileError(f"{path}: corrupt: int8 codes must be in [-127, 127]")
        index._rows, index._n = rows, count
        index._mmap = raw if (mmap and payload > 0) else None
        if device.type != "cpu":
            index = index.to(device)
        return index

    def to(self, device: Union[str, torch.device]) -> "Index":
        """A copy of this index on `device` (rows copied)."""
        out = Index(self._dim, self._dtype, self._metric, device=device)
        rows, scales, sums = self._rows_view()
        out._rows, out._scales, out._sums = rows.to(out.device).contiguous(), scales.to(out.device), sums.to(out.device)
        out._n = self._n
        return out

    def to_faiss(self):
        """This index as a FAISS index with the same vectors (fp32 -> IndexFlatIP, fp16 ->
        IndexScalarQuantizer QT_fp16); see solar_kernels.integrations.faiss (needs faiss-cpu)."""
        from .integrations.faiss import to_faiss

        return to_faiss(self)

    @classmethod
    def from_faiss(cls, faiss_index, device: Union[str, torch.device] = "cpu") -> "Index":
        """An Index with the vectors of a FAISS IndexFlatIP ("fp32") or QT_fp16 inner-product
        IndexScalarQuantizer ("fp16"); see solar_kernels.integrations.faiss (needs faiss-cpu)."""
        from .integrations.faiss import from_faiss

        return from_faiss(faiss_index, cls, device=device)


def topk_search(q, db, k: int, *, simd=None, strategy: str = "auto",
                num_threads: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One-shot exact fp32 top-k of q [m, d] against db [n, d] by inner product.

    Both are converted to float32 (`db` is used in place when it is a contiguous float32
    tensor) and scored exactly, as by an fp32 :class:`Index` without building one.

    Args:
        q: queries [m, d] (or one query [d]): a torch.Tensor or numpy.ndarray of float16,
            bfloat16, float32 or float64, finite, on the same device type as `db`; m may be 0.
        db: the rows to search [n, d], n >= 1: a float torch.Tensor or numpy.ndarray (same
            dtypes), finite, on CPU or CUDA (CUDA needs the extension built with CUDA).
        k: results per query, an int (python, numpy, or a one-element integer tensor) in
            [1, n]; on CUDA also k <= 1024.
        simd: CPU SIMD level: None (SOLAR_SEARCH_SIMD, else the best the CPU has), -1/"auto",
            0/"scalar", 1/"avx2", 2/"avx512"; clamped down to what the CPU supports.  Ignored on CUDA.
        strategy: CPU work split: "auto", "split_queries" (each thread owns queries) or
            "split_rows" (rows split across threads, per-thread top-k merged).  Ignored on CUDA.
        num_threads: CPU threads (None or 0: torch.get_num_threads()).  Ignored on CUDA.

    Returns:
        (scores float32 [m, k], ids int64 [m, k]) on db's device, best first; ties are
        broken by the lower row id of db.

    Raises:
        TypeError: q or db not a tensor/ndarray or not floating; k not an integer.
        ValueError: db not 2-D or empty; q not [m, d] / [d]; NaN or inf in q or db; k outside
            [1, n]; q and db on different devices; an unknown simd or strategy.
        RuntimeError: the native extension (CPU) or its CUDA build (CUDA) is missing, or k > 1024
            on CUDA.
    """
    db_t = _as_tensor("db", db)
    if db_t.dim() != 2:
        raise ValueError(f"db must have shape [n, d], got {tuple(db_t.shape)}")
    check_finite("db", db_t)
    k = _check_k(k, db_t.shape[0], "db")
    q32 = _as_matrix("q", q, db_t.shape[1], db_t.device, home="db")
    db32 = db_t.to(torch.float32).contiguous()
    if q32.shape[0] == 0:
        return (torch.empty(0, k, dtype=torch.float32, device=db_t.device),
                torch.empty(0, k, dtype=torch.int64, device=db_t.device))
    return _run_search(q32, db32, None, None, "fp32", k, simd, strategy, num_threads)


def _pack_header(dtype: str, dim: int, count: int, payload: int, crc: int) -> bytes:
    body = _HEADER.pack(_MAGIC, _VERSION, _DTYPE_CODE[dtype], 0, 0, dim, count, payload, crc, 0, 0)
    hcrc = zlib.crc32(body[:52])
    return body[:52] + struct.pack("<I", hcrc) + body[56:]


def _unpack_header(head: bytes, path: str):
    if len(head) < _HEADER.size:
        raise IndexFileError(f"{path}: truncated: {len(head)} bytes, a SOLAR index header has {_HEADER.size}")
    magic, version, dcode, mcode, _r0, dim, count, payload, crc, hcrc, _r1 = _HEADER.unpack(head)
    if magic != _MAGIC:
        raise IndexFileError(f"{path}: not a SOLAR index (magic {magic!r}, expected {_MAGIC!r})")
    if zlib.crc32(head[:52]) != hcrc:
        raise IndexFileError(f"{path}: corrupt header (header checksum mismatch)")
    if version != _VERSION:
        raise IndexFileError(f"{path}: unsupported format version {version} (this library reads {_VERSION})")
    codes = {v: k for k, v in _DTYPE_CODE.items()}
    if dcode not in codes:
        raise IndexFileError(f"{path}: unknown dtype code {dcode}")
    if mcode != 0:
        raise IndexFileError(f"{path}: unknown metric code {mcode}")
    if dim < 1:
        raise IndexFileError(f"{path}: corrupt header: dim {dim}")
    return codes[dcode], int(dim), int(count), int(payload), int(crc)
