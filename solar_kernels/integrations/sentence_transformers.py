"""A sentence-transformers loss on :func:`solar_kernels.contrastive_loss`: several positives per
anchor, hard negatives, hardness weighting, negatives gathered across ranks, mined negatives.

``SolarRankingLoss(model, scale=20.0)`` takes the same dataset columns as the library's
``MultipleNegativesRankingLoss`` -- (anchor, positive[, negative_1, ..., negative_n]) -- and,
with the defaults, returns the same value and gradients: anchor i is scored by cosine
similarity times ``scale`` against every candidate of the batch (all positives and all
negatives of all anchors), its own positive being the target.  On top of that:

* ``num_positives=P``: the first P candidate columns are all positives of their anchor
  (anchor, positive_1, ..., positive_P, negative_1, ...), and an integer ``label`` column,
  when the dataset has one, groups anchors: anchors with the same label share their positives
  (duplicate queries are then not each other's false negatives).
* ``hardness=beta``: negatives re-weighted by exp(beta * logit), normalised per anchor
  (Robinson et al. 2021, as in `contrastive_loss`; not the additive penalty of
  MultipleNegativesRankingLoss's ``hardness_mode``).
* ``gather_across_devices=True``: under torch.distributed every anchor is scored against the
  candidates of all ranks (O(N x D) memory per rank).  The gradients equal those of
  MultipleNegativesRankingLoss with ``gather_across_devices=True``; the value is the mean over
  all ranks' anchors (the same on every rank; MultipleNegativesRankingLoss reports each
  rank's own mean).
* ``mine_k=k``: after each forward, ``loss.last_mined`` holds each anchor's k hardest
  negatives in the batch; :func:`mine_hard_negatives` mines a whole corpus with an exact
  :class:`solar_kernels.Index` to build the next epoch's negative columns.

The swap in a training script::

    from solar_kernels.integrations.sentence_transformers import SolarRankingLoss
    loss = SolarRankingLoss(model, scale=20.0)     # instead of losses.MultipleNegativesRankingLoss(model)

The loss is the rectangular form of :func:`solar_kernels.contrastive_loss` (``offset=0``): the
n anchors against the C x n candidate columns (C = positives + negatives per anchor), n x Cn
logits computed tile by tile, never stored.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

import solar_kernels as sk

from ._autograd import ScaleGrad

__all__ = ["SolarRankingLoss", "mine_hard_negatives"]


def _is_cos_sim(fn) -> bool:
    if fn is None:
        return True
    try:
        from sentence_transformers.util import cos_sim
    except ImportError:
        cos_sim = None
    return fn is cos_sim or getattr(fn, "__name__", "") == "cos_sim"


def _embed(model, sentence_features) -> list:
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [model(f)["sentence_embedding"] for f in sentence_features]
    return embed_columns(model, sentence_features)


class SolarRankingLoss(nn.Module):
    """In-batch ranking loss with the interface of sentence-transformers' losses (see the module doc).

    Args:
        model: the SentenceTransformer being trained.
        scale: inverse temperature applied to the cosine similarities (> 0; 20 as in MNRL).
        similarity_fct: must be cosine similarity (``sentence_transformers.util.cos_sim`` or
            None); the embeddings are L2-normalised and compared by inner product.
        num_positives: how many candidate columns after the anchor are positives (>= 1).
        hardness: beta >= 0 of the negatives' hardness weighting (0: plain InfoNCE).
        gather_across_devices: score against the candidates of every torch.distributed rank.
        mine_k: record each anchor's mine_k hardest in-batch negatives in ``last_mined``.
    """

    def __init__(self, model, scale: float = 20.0, similarity_fct=None, num_positives: int = 1,
                 hardness: float = 0.0, gather_across_devices: bool = False, mine_k: int = 0):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        if not _is_cos_sim(similarity_fct):
            raise ValueError(f"similarity_fct must be cosine similarity (sentence_transformers.util.cos_sim or "
                             f"None), got {getattr(similarity_fct, '__name__', similarity_fct)!r}")
        for name, v, lo in (("num_positives", num_positives, 1), ("mine_k", mine_k, 0)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if isinstance(hardness, bool) or not isinstance(hardness, numbers.Real) or not hardness >= 0:
            raise ValueError(f"hardness must be a number >= 0, got {hardness!r}")
        self.model = model
        self.scale = float(scale)
        self.num_positives = int(num_positives)
        self.hardness = float(hardness)
        self.gather_across_devices = bool(gather_across_devices)
        self.mine_k = int(mine_k)
        self.last_mined: Optional[dict] = None

    @property
    def temperature(self) -> float:
        """1 / scale."""
        return 1.0 / self.scale

    def get_config_dict(self) -> dict:
        """The hyperparameters, as sentence-transformers writes them into model cards."""
        return {"scale": self.scale, "similarity_fct": "cos_sim", "num_positives": self.num_positives,
                "hardness": self.hardness, "gather_across_devices": self.gather_across_devices,
                "mine_k": self.mine_k}

    def forward(self, sentence_features: Iterable[dict], labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed every column with the model, then :meth:`compute_loss_from_embeddings`."""
        return self.compute_loss_from_embeddings(_embed(self.model, list(sentence_features)), labels)

    def _group(self):
        if not self.gather_across_devices:
            return None
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return dist.group.WORLD

    def compute_loss_from_embeddings(self, embeddings: Sequence[torch.Tensor],
                                     labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of column embeddings [anchor, candidate_1, ...], each [n, D].

        labels: None, or [n] integer group ids of the anchors (anchors sharing one share positives).
        """
        embeddings = list(embeddings)
        P = self.num_positives
        if len(embeddings) < 1 + P:
            raise ValueError(f"embeddings: expected the anchor column and at least {P} positive column(s), got "
                             f"{len(embeddings)} column(s)")
        n = embeddings[0].shape[0]
        for c, e in enumerate(embeddings):
            if e.dim() != 2 or e.shape != embeddings[0].shape:
                raise ValueError(f"embeddings[{c}] must have the anchor column's shape {tuple(embeddings[0].shape)}, "
                                 f"got {tuple(e.shape)}")
        group = self._group()
        rank, world = 0, 1
        if group is not None:
            import torch.distributed as dist

            rank, world = dist.get_rank(group), dist.get_world_size(group)
        embeddings = [torch.nn.functional.normalize(e, dim=-1) for e in embeddings]
        if world > 1:   # all_gather-with-grad semantics of MNRL: gradients summed over ranks
            embeddings = [ScaleGrad.apply(e, float(world)) for e in embeddings]
        anchors, cands = embeddings[0], torch.cat(embeddings[1:])
        M = cands.shape[0]
        groups = self._column_groups(labels, n, M, rank, world, anchors.device)
        # anchor i's first positive is candidate column i (offset 0); on many ranks rank r's
        # candidate j is global column r * M + j
        out = sk.contrastive_loss(anchors, cands, offset=0, groups=groups, temperature=1.0 / self.scale,
                                  symmetric=False, hardness=self.hardness, mine_k=self.mine_k, process_group=group)
        loss, mined = out if isinstance(out, tuple) else (out, None)
        if mined is not None:
            pos = mined.indices
            j = pos % M
            self.last_mined = {"rank": pos // M, "column": j // n, "row": j % n, "scores": mined.scores}
        return loss

    def _column_groups(self, labels, n: int, M: int, rank: int, world: int, device) -> Optional[torch.Tensor]:
        """Group id of every candidate position: positive columns take their anchor's group,
        negative columns groups of their own."""
        P = self.num_positives
        if labels is None and P == 1:
            return None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point() \
                    or labels.dtype == torch.bool:
                got = (f"{str(labels.dtype).replace('torch.', '')} {tuple(labels.shape)}"
                       if isinstance(labels, torch.Tensor) else type(labels).__name__)
                raise ValueError(f"labels must be None or [{n}] integer anchor group ids (the dataset's 'label' "
                                 f"column), got {got}")
            anchor_g = labels.to(device=device, dtype=torch.int64)
            if world > 1:
                import torch.distributed as dist

                top = anchor_g.max().reshape(1).clone()
                dist.all_reduce(top, op=dist.ReduceOp.MAX)
                base = int(top) + 1
            else:
                base = int(anchor_g.max()) + 1
            if int(anchor_g.min()) < 0:
                raise ValueError(f"labels must be >= 0, got a minimum of {int(anchor_g.min())}")
        else:
            anchor_g = torch.arange(rank * n, (rank + 1) * n, dtype=torch.int64, device=device)
            base = world * n
        neg = M - P * n
        own = base + rank * neg + torch.arange(neg, dtype=torch.int64, device=device)
        return torch.cat([anchor_g.repeat(P), own])


@torch.no_grad()
def mine_hard_negatives(model, anchors: Sequence[str], positives: Sequence[str], corpus: Optional[Sequence[str]] = None,
                        num_negatives: int = 1, *, batch_size: int = 32, dtype: str = "fp32",
                        exclude_top: int = 0) -> dict:
    """The next epoch's training columns: each anchor with its positive and its hardest negatives.

    Embeds ``anchors`` and ``corpus`` (default: the positives) with ``model.encode`` (cosine:
    L2-normalised), searches the corpus with an exact :class:`solar_kernels.Index` of ``dtype``,
    and keeps for each anchor the best-scoring texts that are neither its own positive nor the
    anchor itself (skipping the ``exclude_top`` best of those, a guard against unlabelled
    positives).  Returns ``{"anchor": [...], "positive": [...], "negative_1": [...], ...}``
    (``datasets.Dataset.from_dict`` makes it a dataset).  ValueError when the corpus cannot
    supply ``num_negatives`` negatives for every anchor.
    """
    if len(anchors) != len(positives) or len(anchors) == 0:
        raise ValueError(f"anchors / positives: expected two non-empty sequences of equal length, got "
                         f"{len(anchors)} and {len(positives)}")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, numbers.Integral) or num_negatives < 1:
        raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
    corpus = list(dict.fromkeys(positives if corpus is None else corpus))
    emb = lambda texts: torch.as_tensor(model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                                     normalize_embeddings=True, show_progress_bar=False))
    c_emb = emb(corpus)
    index = sk.Index(c_emb.shape[1], dtype=dtype)
    index.add(c_emb)
    want = num_negatives + int(exclude_top) + 2       # room for the positive and the anchor itself
    if want > len(corpus):
        raise ValueError(f"corpus: {len(corpus)} distinct texts cannot supply {num_negatives} negatives per anchor "
                         f"(+ exclude_top {exclude_top}, the positive and the anchor)")
    _, ids = index.search(emb(anchors), want)
    cols: dict[str, list] = {"anchor": list(anchors), "positive": list(positives)}
    for h in range(num_negatives):
        cols[f"negative_{h + 1}"] = []
    for a, p, row in zip(anchors, positives, ids.tolist()):
        cand = [corpus[j] for j in row if corpus[j] != p and corpus[j] != a][int(exclude_top):]
        for h in range(num_negatives):
            cols[f"negative_{h + 1}"].append(cand[h])
    return cols
