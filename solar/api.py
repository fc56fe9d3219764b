"""Use a trained model: pair embeddings and a small retriever.

    import solar
    from PIL import Image

    emb = solar.encode([Image.open("a.png")], ["a red circle made of wood"], model="runs/solar/stage2/model")
    # emb: [1, E] float32 on CPU; E = the model's cfg.embed_dim (96 for the tiny ShapesWorld models)
    r = solar.Retriever("runs/solar/stage2/model")
    r.add(images, captions, ids=names)                 # the collection: (image, text) pairs
    scores, hits = r.search([query_image], ["query caption"], k=5)   # hits: the ids given to add

A pair is one (image, text); its embedding is one L2-normalised vector (inner product =
cosine).  `model` is a model folder written by `solar.train` (stage2/model,
stage1/stage1_model or clip_sf/model; the embedding rule is read from the folder's
solar_embedding.json, and a folder without one is refused unless ``kind=`` names the rule)
or a loaded `SolarModel`.  Images are PIL images, paths, or uint8 HxWx3 arrays; they are
resized and cropped to the model's input size exactly as in training.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from .towers import image_stats, resolve_tokenizer

__all__ = ["load", "encode", "Retriever", "resolve_tokenizer"]


def load(model, device=None, kind: Optional[str] = None):
    """(SolarModel in eval mode, embedding kind) for `model`.

    model: one of
      * a model folder written by `solar.train` (stage2/model, stage1/stage1_model or
        clip_sf/model); the kind is read from its solar_embedding.json; a folder without
        that file (e.g. a training checkpoint) is a CheckpointError unless `kind` is given,
        and a `kind` that contradicts the file is one too;
      * a loaded `SolarModel` (kind "solar");
      * a ``(model, kind)`` tuple, as this function returns it (the kind is checked).
      The kind is the embedding rule: "solar" (SOLAR's fused pair embedding, `SolarModel.embed`,
      [N, cfg.embed_dim]), "clip_sf" (the CLIP score-fusion baseline, normalise(f_I + f_T),
      [N, cfg.width]) or "clip_zs" (zero-shot CLIP-SF from pretrained towers' projection heads).
    device: None (a folder is loaded on CPU; a given model stays where it is), or "auto" (CUDA
      when available, else CPU), "cpu", "cuda", "cuda:N" or a torch.device: the model is moved
      there.  A ValueError names `device` for any other string or a CUDA device torch cannot
      see.  A given model is put in eval mode in place (and moved in place by ``.to``).
    kind: None, "solar", "clip_sf" or "clip_zs": the embedding rule of a folder without
      solar_embedding.json; for a loaded model or a tuple it replaces the kind."""
    from .baselines import EMBEDDING_KINDS
    from .distributed import resolve_device
    from .evaluate import load_for_eval
    if kind is not None and kind not in EMBEDDING_KINDS:
        raise ValueError(f"kind: expected None or one of {EMBEDDING_KINDS}, got {kind!r}")
    dev = resolve_device(device, name="device") if device is not None else None
    if isinstance(model, (str, os.PathLike)):
        m, kind = load_for_eval(str(model), dev or "cpu", kind=kind)
    elif _is_model(model):
        m, kind = model, kind or "solar"
    elif isinstance(model, tuple) and len(model) == 2 and _is_model(model[0]):
        m, k = model
        if k not in EMBEDDING_KINDS:
            raise ValueError(f"model: the (model, kind) tuple's kind must be one of {EMBEDDING_KINDS}, got {k!r}")
        kind = kind or k
    else:
        raise TypeError(f"model: expected a model folder path, a SolarModel or a (SolarModel, kind) tuple, "
                        f"got {type(model).__name__}")
    if dev is not None and not isinstance(model, (str, os.PathLike)):
        m = m.to(dev)
    return m.eval(), kind


def _is_model(x) -> bool:
    return hasattr(x, "embed") and hasattr(x, "cfg")


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size: expected an int >= 1, got {type(batch_size).__name__} {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    return int(batch_size)


def _check_sequence(name: str, x, what: str) -> None:
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name}: expected a sequence of {what} (one per pair), got a single {type(x).__name__}; "
                        f"wrap it in a list: [{name[:-1]}]")
    if not hasattr(x, "__len__") or not hasattr(x, "__getitem__"):
        raise TypeError(f"{name}: expected a sequence (list, tuple) of {what}, got {type(x).__name__}")


def _to_pil(x, i: int):
    from PIL import Image
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, (str, os.PathLike)):
        if not os.path.isfile(x):
            raise FileNotFoundError(f"images[{i}]: no such file {str(x)!r}")
        return Image.open(x).convert("RGB")
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[-1] == 3 and a.dtype == np.uint8:
        return Image.fromarray(a)
    raise TypeError(f"images[{i}]: expected a PIL image, a path or a uint8 HxWx3 array, got {type(x).__name__}"
                    + (f" with shape {a.shape} dtype {a.dtype}" if hasattr(a, "shape") else ""))


@torch.no_grad()
def encode(images: Sequence, texts: Sequence[str], model, *, tokenizer=None, batch_size: int = 64,
           device=None, kind: Optional[str] = None) -> torch.Tensor:
    """Pair embeddings of (images[i], texts[i]): a float32 tensor [N, E] on CPU, rows L2-normalised
    (inner product = cosine).

    E is set by the model's config: ``cfg.embed_dim`` for the "solar" kind (96 for the shipped
    ShapesWorld `tiny` models, 768 for `clip-b16`), ``cfg.width`` for "clip_sf" (96 for `tiny`).

    images: a sequence (list, tuple) of N images: PIL images, file paths or uint8 HxWx3 arrays
    (resized and cropped to the model's input size as in training).
    texts: a sequence of N non-empty caption strings; a bare str is a TypeError.
    model: a model folder written by `solar.train`, a loaded `SolarModel`, or a (model, kind)
    tuple (see `load`).
    tokenizer: None (the default: the tokenizer saved with the model; see `resolve_tokenizer`),
    "shapesworld", "clip", a local tokenizer folder, or a tokenizer object.
    batch_size: pairs per forward pass (an int >= 1).
    device: where the model runs (see `load`): None loads a folder on CPU and leaves a given model
    where it is; "auto", "cpu", "cuda", "cuda:N" or a torch.device move it there.  The result is
    on CPU either way.
    kind: the embedding rule ("solar", "clip_sf" or "clip_zs"): required for a model folder without
    solar_embedding.json (an error if it contradicts the file); replaces the kind of a loaded
    model or tuple."""
    from .baselines import EMBEDDING_KINDS, pair_embedding
    from .data.reader import ImageTransform, collate_pairs
    _check_sequence("images", images, "images")
    _check_sequence("texts", texts, "strings")
    batch_size = _check_batch_size(batch_size)
    if kind is not None and kind not in EMBEDDING_KINDS:
        raise ValueError(f"kind: expected None or one of {EMBEDDING_KINDS}, got {kind!r}")
    if len(images) != len(texts):
        raise ValueError(f"images/texts: expected equal lengths, got {len(images)} and {len(texts)}")
    if len(images) == 0:
        raise ValueError("images: expected at least one pair")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"texts[{i}]: expected a non-empty string, got {t!r}")
    m, kind = load(model, device, kind)
    tok = resolve_tokenizer(m, tokenizer)
    transform = ImageTransform(m.cfg.image_size, "center", *(tuple(x) for x in image_stats(m.cfg)))
    out = []
    for s in range(0, len(images), batch_size):
        ims = [_to_pil(x, s + j) for j, x in enumerate(images[s:s + batch_size])]
        b = collate_pairs(ims, list(texts[s:s + batch_size]), tok, image_size=m.cfg.image_size,
                          patch_size=m.cfg.patch_size, max_length=m.cfg.max_text_len, transform=transform)
        b = {key: (v.to(m.device) if torch.is_tensor(v) else v) for key, v in b.items()}
        out.append(pair_embedding(m, b, kind).float().cpu())
    return torch.cat(out)


class Retriever:
    """An exact `solar_kernels.Index` over a collection of pairs, answering pair queries.

    model: a model folder written by `solar.train`, a loaded `SolarModel` or a (model, kind)
      tuple (see `load`); it embeds both the collection and the queries.
    dtype: the Index's storage: "fp32" (exact scores), "fp16" (half-precision rows) or "int8"
      (per-row quantised, 4x smaller than fp32); see `solar_kernels.Index`.
    tokenizer: None (the model's own, saved with it), "shapesworld", "clip", a local tokenizer
      folder or a tokenizer object (as in `encode`).
    device: where the model embeds pairs (see `load`; None: a folder is loaded on CPU).  The
      Index always stays on CPU: embeddings come back to CPU and are searched there.
    batch_size: pairs per forward pass when embedding (an int >= 1).
    kind: the embedding rule, "solar", "clip_sf" or "clip_zs" (see `load`): needed for a model folder
      without solar_embedding.json.

    add(images, texts, ids=None) embeds and stores pairs (ids default to 0, 1, ...);
    add_embeddings(emb, ids=None) stores precomputed embeddings [n, E];
    search(images, texts, k) -> (scores [Q, k] float32, hits: list of Q lists of ids)."""

    def __init__(self, model, *, dtype: str = "fp32", tokenizer=None, device=None, batch_size: int = 64,
                 kind: Optional[str] = None):
        import solar_kernels as sk

        from .baselines import embedding_dim
        from .config import INDEX_DTYPES
        if dtype not in INDEX_DTYPES:
            raise ValueError(f"dtype: expected one of {INDEX_DTYPES}, got {dtype!r}")
        self.batch_size = _check_batch_size(batch_size)
        self.model, self.kind = load(model, device, kind)
        self.tokenizer = resolve_tokenizer(self.model, tokenizer)
        self.index = sk.Index(embedding_dim(self.model, self.kind), dtype=dtype)   # on CPU
        self.ids: list = []

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, images, texts) -> torch.Tensor:
        """Pair embeddings with this retriever's model."""
        return encode(images, texts, (self.model, self.kind), tokenizer=self.tokenizer, batch_size=self.batch_size)

    def add(self, images, texts, ids: Optional[Sequence] = None) -> "Retriever":
        """Embed (images[i], texts[i]) and add them to the collection under ids[i]."""
        emb = self.encode(images, texts)
        return self.add_embeddings(emb, ids)

    def add_embeddings(self, emb, ids: Optional[Sequence] = None) -> "Retriever":
        """Add precomputed pair embeddings [n, E] (a tensor on any device, an array or a list of rows;
        E = the Index's width) under ids[i] (default: the next integers)."""
        dim = self.index.dim
        if isinstance(emb, (np.ndarray, list, tuple)):
            try:
                emb = torch.as_tensor(np.asarray(emb, dtype=np.float32))
            except (TypeError, ValueError) as e:
                raise ValueError(f"emb: expected a [n, {dim}] array of numbers, could not convert it ({e})") from None
        elif not torch.is_tensor(emb):
            raise TypeError(f"emb: expected a [n, {dim}] tensor, array or list of rows, got {type(emb).__name__}")
        if emb.dim() != 2 or emb.shape[1] != dim:
            raise ValueError(f"emb: expected shape [n, {dim}], got {tuple(emb.shape)}")
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"ids: expected a sequence of {len(emb)} ids, got a single {type(ids).__name__}")
        if ids is None:
            ids = list(range(len(self.ids), len(self.ids) + len(emb)))
        if len(ids) != len(emb):
            raise ValueError(f"ids: expected {len(emb)} ids, got {len(ids)}")
        self.index.add(emb.detach().to("cpu", torch.float32).contiguous())
        self.ids += list(ids)
        return self

    def search(self, images, texts, k: int = 10):
        """The k best collection pairs for each query pair: (scores [Q, k], hits [Q][k] ids)."""
        if not self.ids:
            raise ValueError("Retriever.search: the collection is empty; call add() first")
        if not 1 <= k <= len(self.ids):
            raise ValueError(f"k: expected 1 <= k <= {len(self.ids)} (the collection size), got {k}")
        q = self.encode(images, texts)
        scores, idx = self.index.search(q, k)
        return scores, [[self.ids[int(j)] for j in row] for row in idx]
