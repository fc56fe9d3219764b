"""Use a trained model: pair embeddings and a small retriever.

    import solar
    from PIL import Image

    emb = solar.encode([Image.open("a.png")], ["a red circle made of wood"], model="runs/solar/stage2/model")
    r = solar.Retriever("runs/solar/stage2/model")
    r.add(images, captions, ids=names)                 # the collection: (image, text) pairs
    scores, hits = r.search([query_image], ["query caption"], k=5)   # hits: the ids given to add

A pair is one (image, text); its embedding is one L2-normalised vector (inner product =
cosine).  `model` is a model folder written by `solar.train` (stage2/model,
stage1/stage1_model or clip_sf/model; the embedding rule is read from the folder) or a
loaded `SolarModel`.  Images are PIL images, paths, or uint8 HxWx3 arrays; they are
resized and cropped to the model's input size exactly as in training.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["load", "encode", "Retriever"]


def load(model, device=None):
    """(SolarModel in eval mode, embedding kind) from a folder path or a loaded model."""
    from .evaluate import load_for_eval
    dev = torch.device(device) if device is not None else None
    if isinstance(model, (str, os.PathLike)):
        m, kind = load_for_eval(str(model), dev or "cpu")
    elif hasattr(model, "embed") and hasattr(model, "cfg"):
        m, kind = model, "solar"
        if dev is not None:
            m = m.to(dev)
    elif isinstance(model, tuple) and len(model) == 2:
        m, kind = model
    else:
        raise TypeError(f"model: expected a model folder path or a SolarModel, got {type(model).__name__}")
    return m.eval(), kind


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
def encode(images: Sequence, texts: Sequence[str], model, *, tokenizer="shapesworld", batch_size: int = 64,
           device=None, kind: Optional[str] = None) -> torch.Tensor:
    """Pair embeddings [N, E] (float32, L2-normalised, on CPU) of (images[i], texts[i]).

    tokenizer: "shapesworld" (the default data's tokenizer), a local tokenizer folder, or a
    tokenizer object.  kind overrides the embedding rule ("solar" or "clip_sf")."""
    from .baselines import pair_embedding
    from .data.reader import collate_pairs
    from .data.tokenizer import load_tokenizer
    m, k = load(model, device)
    kind = kind or k
    if len(images) != len(texts):
        raise ValueError(f"images/texts: expected equal lengths, got {len(images)} and {len(texts)}")
    if len(images) == 0:
        raise ValueError("images: expected at least one pair")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"texts[{i}]: expected a non-empty string, got {t!r}")
    tok = load_tokenizer(tokenizer, model_max_length=m.cfg.max_text_len) if isinstance(tokenizer, str) else tokenizer
    out = []
    for s in range(0, len(images), batch_size):
        ims = [_to_pil(x, s + j) for j, x in enumerate(images[s:s + batch_size])]
        b = collate_pairs(ims, list(texts[s:s + batch_size]), tok, image_size=m.cfg.image_size,
                          patch_size=m.cfg.patch_size, max_length=m.cfg.max_text_len)
        b = {key: (v.to(m.device) if torch.is_tensor(v) else v) for key, v in b.items()}
        out.append(pair_embedding(m, b, kind).float().cpu())
    return torch.cat(out)


class Retriever:
    """An exact `solar_kernels.Index` over a collection of pairs, answering pair queries.

    add(images, texts, ids=None) embeds and stores pairs (ids default to 0, 1, ...);
    search(images, texts, k) -> (scores [Q, k] float32, hits: list of Q lists of ids)."""

    def __init__(self, model, *, dtype: str = "fp32", tokenizer="shapesworld", device=None, batch_size: int = 64):
        import solar_kernels as sk
        self.model, self.kind = load(model, device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.index = sk.Index(self.model.cfg.embed_dim if self.kind == "solar" else self.model.cfg.width,
                              dtype=dtype)
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

    def add_embeddings(self, emb: torch.Tensor, ids: Optional[Sequence] = None) -> "Retriever":
        """Add precomputed pair embeddings [n, E]."""
        if ids is None:
            ids = list(range(len(self.ids), len(self.ids) + len(emb)))
        if len(ids) != len(emb):
            raise ValueError(f"ids: expected {len(emb)} ids, got {len(ids)}")
        self.index.add(emb.float().contiguous())
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
