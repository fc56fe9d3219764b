"""Stage 2: self-supervised multimodal embedding learning (SOLAR.md "Stage 2").

A frozen copy of the stage-1 model (the *teacher*) and its thresholds tau_V, tau_L turn
every unlabeled (image, caption) pair into views, all encoded by the trained model
(the *student*, initialised from stage 1) through E_VL with key masks:

* text: s_L(t) > tau_L marks intersection tokens (also said by the image).
  - positive view: hide a random share (`text_pos_drop`) of the intersection tokens;
    every difference token stays, so the pair still carries all its information;
  - hard-negative view: hide every difference token (s_L <= tau_L); the text-only
    content is gone, so the view describes a poorer, different item.
* image: patch features of the teacher (+ grid position) are clustered into
  `n_segments` coarse segments by a few k-means iterations (a lone hidden patch is easy
  to re-infer from its neighbours, so whole segments are hidden); each segment is
  scored by the mean s_V of its patches.
  - positive view: hide (each with probability `img_pos_drop`, at least one) the
    segments scoring above tau_V;
  - hard-negative view: hide every segment scoring at or below tau_V.
* Neutral positions are hidden by no view (our addition; the paper does not discuss it):
  caption tokens that occur in more than `text_neutral_df` of the training captions
  (function words: "a", "at", "and") and patches whose adapted token norm is below
  `img_neutral_ratio` x the largest of their image (flat background: they add almost
  nothing to the global image embedding; they belong to no segment).  Neither is
  intersection nor difference content, and hiding them hands the loss a shortcut: a
  hard-negative view without background or without "a"/"and" is told apart by that alone
  (measured: docs/EXPERIMENTS.md).
* Each view masks one side: per pair and per view a fair coin picks the text or the
  image side (the other side when the chosen one has nothing to hide), so one E_VL pass
  encodes one view of every pair.
* Rows of the loss: the full pair and `n_pos_views` positive views share a group; the
  hard negatives of a pair are its `n_hard_views` difference-hiding views and `mine_k`
  offline-mined neighbours.  A hard-negative view that hides nothing (the pair has no
  difference on either side) would equal the pair itself; it is replaced by -f (the
  row's own embedding negated, detached), whose term exp(-1/eta) is negligible, i.e.
  it is dropped.
* Offline mining (`Miner`): every `refresh_every` steps the training pool is embedded
  with the current model into a `solar_kernels.Index`; each pair's nearest pool
  neighbours (self excluded) under its current embedding are its mined negatives.  On
  streamed shards the pool holds embeddings only, sharded by rank (`solar.mining`).  Both
  banks are checkpointed (the in-memory one by rank 0, a streamed one by each rank for its
  share) and restored on resume, so a resumed run mines what an uninterrupted one does.
* Loss: `solar_kernels.contrastive_loss` in single-set mode (multi-positive InfoNCE,
  temperature eta), over the global batch when distributed (process_group).

All random choices of step s are drawn from a generator seeded with (seed, s) over the
whole global batch and sliced by rank, so a resumed run and a run on any number of
ranks draw the same views as one uninterrupted process.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import solar_kernels as sk

from .averaging import attach_ema
from .config import Stage2Config, validate_config
from .selection import attach_selection
from .distributed import DistInfo, get_dist
from .mining import DocFrequency, EmbeddingPool, PoolSource, pool_frequent_token_ids
from .trainer import LoopOptions, OptimSpec, Phase, batch_to, train_loop

__all__ = ["frequent_token_ids", "low_norm_patches", "segment_patches", "text_views", "image_views", "Views",
           "build_views", "Miner", "Stage2Loss", "run_stage2", "step_generator"]


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, step, salt) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt * 104_729) % (2 ** 62))


# --------------------------------------------------------------------------- neutral positions

@torch.no_grad()
def frequent_token_ids(input_ids: torch.Tensor, valid: torch.Tensor, max_df: float) -> torch.Tensor:
    """Token ids that occur in more than `max_df` of the captions (document frequency).

    input_ids [N, T], valid [N, T] bool (content tokens).  These are the corpus' function
    words ("a", "and", "of" in English captions): they say nothing about which content a
    pair has, so stage 2 never hides them.  Counted by `solar.mining.DocFrequency` in chunks
    of captions (memory O(vocabulary + chunk), never an N x vocabulary matrix).  Returns a
    sorted int64 tensor (empty when max_df <= 0 or >= 1, or there are no captions)."""
    if input_ids.shape != valid.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids / valid: expected two [N, T] tensors, got {tuple(input_ids.shape)} "
                         f"and {tuple(valid.shape)}")
    counter = DocFrequency()
    for s in range(0, input_ids.shape[0], 65536):
        counter.update(input_ids[s:s + 65536], valid[s:s + 65536])
    return counter.frequent(max_df)


@torch.no_grad()
def low_norm_patches(v: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, P] bool: patches whose adapted token norm is below `ratio` x the largest in their image.

    The global image embedding is the mean of the adapted patch tokens, so such a patch adds
    almost nothing to it: stage 1 has learnt that it carries no content (flat background in
    ShapesWorld).  Stage 2 never hides it.  ratio <= 0: no patch is neutral."""
    n = v.float().norm(dim=-1)
    if ratio <= 0:
        return torch.zeros_like(n, dtype=torch.bool)
    return n < ratio * n.amax(1, keepdim=True)


# --------------------------------------------------------------------------- segments

@torch.no_grad()
def segment_patches(feats: torch.Tensor, k: int, iters: int = 5, position_weight: float = 1.0,
                    grid: Optional[tuple] = None, active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cluster each image's patches into `k` segments by Lloyd's k-means.

    feats [B, P, W] patch features; the clustering features are the L2-normalised patch
    features concatenated with position_weight * (row, col) / grid_size (so segments are
    spatially coherent).  Initial centres: k patches evenly spaced in raster order
    (deterministic).  Returns seg [B, P] int64 in [0, k); every id that occurs is one
    connected-by-assignment set of patches (a segment is always hidden or kept whole).

    active [B, P] bool (optional): only these patches are clustered (initial centres are
    evenly spaced among them); the others get segment id -1 (no segment, never hidden).
    """
    if feats.dim() != 3:
        raise ValueError(f"feats: expected [B, P, W], got {tuple(feats.shape)}")
    B, P, _ = feats.shape
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    k = min(k, P)
    if grid is None:
        side = int(round(math.sqrt(P)))
        grid = (side, P // side) if side * (P // side) == P else (1, P)
    gh, gw = grid
    if gh * gw != P:
        raise ValueError(f"grid: {grid} does not cover P={P} patches")
    dev = feats.device
    rows = torch.arange(P, device=dev) // gw
    cols = torch.arange(P, device=dev) % gw
    pos = torch.stack([rows / max(1, gh - 1), cols / max(1, gw - 1)], dim=-1).float()
    x = torch.cat([F.normalize(feats.float(), dim=-1), position_weight * pos.expand(B, P, 2)], dim=-1)
    if active is None:
        init = torch.linspace(0, P - 1, k, device=dev).round().long().expand(B, k)
        act = torch.ones(B, P, dtype=torch.bool, device=dev)
    else:
        if active.shape != (B, P):
            raise ValueError(f"active: expected shape {(B, P)}, got {tuple(active.shape)}")
        act = active.to(dev).bool()
        # the j-th initial centre is the active patch of rank round(j (count - 1) / (k - 1))
        rank = act.long().cumsum(1) - 1                                      # [B, P]
        cnt = act.sum(1, keepdim=True)                                       # [B, 1]
        frac = torch.linspace(0, 1, k, device=dev)[None]                     # [1, k]
        want = (frac * (cnt - 1).clamp_min(0)).round().long()                # [B, k]
        hit = act[:, None, :] & (rank[:, None, :] == want[:, :, None])       # [B, k, P]
        init = hit.float().argmax(-1)                                        # [B, k] (0 when none active)
    centres = torch.gather(x, 1, init[..., None].expand(B, k, x.shape[-1]))  # [B, k, D]
    w = act.float()[..., None]
    assign = None
    for _ in range(max(1, iters)):
        d = torch.cdist(x, centres)                          # [B, P, k]
        assign = d.argmin(-1)                                # [B, P]
        onehot = F.one_hot(assign, k).float() * w            # [B, P, k]
        counts = onehot.sum(1)                               # [B, k]
        sums = onehot.transpose(1, 2) @ x                    # [B, k, D]
        # an empty cluster keeps its previous centre
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    return assign.masked_fill(~act, -1)


# --------------------------------------------------------------------------- views

def text_views(s_l: torch.Tensor, valid: torch.Tensor, attention: torch.Tensor, tau: float, *, drop: float,
               u: torch.Tensor, margin: float = 0.0, neutral: Optional[torch.Tensor] = None):
    """Text keep masks for the positive and the hard-negative view.

    s_l [B, T] token-to-global-image similarities; valid [B, T] content tokens;
    attention [B, T] every real position (content + special tokens); u [B, T] uniform
    draws in [0, 1).  Intersection = valid & (s_l > tau + margin); difference = valid &
    (s_l <= tau - margin) (tokens in the margin band are never hidden); `neutral` [B, T]
    bool marks tokens that are neither (function words, see `frequent_token_ids`).
    Returns (pos_keep, neg_keep, neg_changed [B]): the positive hides each intersection
    token with probability `drop` (and at least one when the pair has any); the hard
    negative hides every difference token; neg_changed says whether it hid anything.
    """
    valid = valid.bool()
    attention = attention.bool() | valid
    content = valid if neutral is None else valid & ~neutral.bool()
    inter = content & (s_l > tau + margin)
    diff = content & (s_l <= tau - margin)
    hide = inter & (u < drop)
    # at least one hidden intersection token: the one with the smallest draw
    has_inter = inter.any(1)
    none_hidden = has_inter & ~hide.any(1)
    if none_hidden.any():
        first = torch.where(inter, u, torch.full_like(u, 2.0)).argmin(1)
        force = F.one_hot(first, s_l.shape[1]).bool() & none_hidden[:, None]
        hide = hide | force
    pos_keep = attention & ~hide
    neg_keep = attention & ~diff
    return pos_keep, neg_keep, diff.any(1)


def image_views(s_v: torch.Tensor, seg: torch.Tensor, k: int, tau: float, *, drop: float, u: torch.Tensor,
                margin: float = 0.0):
    """Image keep masks for the positive and the hard-negative view, by whole segments.

    s_v [B, P] patch-to-global-text similarities; seg [B, P] segment ids in [0, k), -1 for
    patches in no segment (never hidden); u [B, k] uniform draws.  A segment's score is the
    mean s_v of its patches; segments above tau + margin are intersection, at or below
    tau - margin difference.
    Returns (pos_keep, neg_keep, neg_changed [B]): the positive hides each intersection
    segment with probability `drop` (at least one when any exists); the hard negative
    hides every difference segment.
    """
    B, P = s_v.shape
    member = seg >= 0
    onehot = F.one_hot(seg.clamp_min(0), k).float() * member[..., None].float()   # [B, P, k]
    counts = onehot.sum(1)                                   # [B, k]
    score = (onehot * s_v.float()[..., None]).sum(1) / counts.clamp_min(1)
    present = counts > 0
    inter = present & (score > tau + margin)
    diff = present & (score <= tau - margin)
    hide = inter & (u < drop)
    none_hidden = inter.any(1) & ~hide.any(1)
    if none_hidden.any():
        first = torch.where(inter, u, torch.full_like(u, 2.0)).argmin(1)
        hide = hide | (F.one_hot(first, k).bool() & none_hidden[:, None])
    seg_hide_pos = torch.gather(hide, 1, seg.clamp_min(0)) & member     # [B, P]
    seg_hide_neg = torch.gather(diff, 1, seg.clamp_min(0)) & member
    return ~seg_hide_pos, ~seg_hide_neg, diff.any(1)


@dataclass
class Views:
    """Keep masks of one batch's views (all [B, P] / [B, T] bool) plus bookkeeping."""

    text_pos: torch.Tensor
    text_neg: torch.Tensor
    text_neg_changed: torch.Tensor
    img_pos: torch.Tensor
    img_neg: torch.Tensor
    img_neg_changed: torch.Tensor
    text_valid: torch.Tensor
    segments: torch.Tensor
    text_pos_changed: torch.Tensor = None
    img_pos_changed: torch.Tensor = None
    pos_side_u: torch.Tensor = None      # [n_pos_views, B] coin draws choosing the masked side
    neg_side_u: torch.Tensor = None      # [n_hard_views, B]

    def positive(self, j: int):
        """(patch_keep, text_keep) of positive view j: one side per pair hides intersection."""
        return _one_side(self.pos_side_u[j], self.text_pos_changed, self.img_pos_changed,
                         self.text_pos & self.text_valid, self.img_pos, self.text_valid)

    def hard_negative(self, h: int):
        """(patch_keep, text_keep, changed [B]) of hard-negative view h: one side hides its differences."""
        pk, tk = _one_side(self.neg_side_u[h], self.text_neg_changed, self.img_neg_changed,
                           self.text_neg & self.text_valid, self.img_neg, self.text_valid)
        return pk, tk, self.text_neg_changed | self.img_neg_changed


def _one_side(u, text_ok, img_ok, text_keep, img_keep, text_full):
    """Per pair: mask the text side (u < 0.5, or the image side has nothing to mask) else the image side."""
    use_text = ((u < 0.5) & text_ok) | ~img_ok
    tk = torch.where(use_text[:, None], text_keep, text_full)
    pk = torch.where(use_text[:, None], torch.ones_like(img_keep), img_keep)
    return pk, tk


@torch.no_grad()
def build_views(teacher, batch: dict, cfg: Stage2Config, *, seed: int, step: int, row_offset: int = 0,
                global_rows: Optional[int] = None, neutral_ids: Optional[torch.Tensor] = None) -> Views:
    """Build the stage-2 views of `batch` with the frozen stage-1 `teacher`.

    Random draws come from step_generator(seed, step) over `global_rows` rows; this
    process's rows are [row_offset, row_offset + B) of them (distributed ranks).
    Neutral positions are never hidden: caption tokens whose id is in `neutral_ids`
    (`frequent_token_ids`) and patches picked by `low_norm_patches(v, cfg.img_neutral_ratio)`
    (these are in no segment)."""
    pv, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    v = teacher.patch_tokens(pv)
    t = teacher.text_tokens(ids, am)
    valid = teacher.text_valid_mask(ids, am)
    # the same s_L as stage 1 computed when it fitted tau_L: phrase-level when the model
    # groups tokens into phrases (text_segments), per token otherwise
    seg_fn = getattr(teacher, "text_segments", None)
    segments = seg_fn(ids, am) if seg_fn is not None else None
    if segments is not None:
        s_v, s_l, _, _ = teacher.similarities_from_tokens(v, t, valid, segments)
    else:
        s_v, s_l, _, _ = teacher.similarities_from_tokens(v, t, valid)
    k = min(cfg.n_segments, v.shape[1])
    active = ~low_norm_patches(v, cfg.img_neutral_ratio) if cfg.img_neutral_ratio > 0 else None
    seg = segment_patches(v, k, cfg.kmeans_iters, cfg.position_weight, active=active)
    neutral_t = None
    if neutral_ids is not None and neutral_ids.numel():
        neutral_t = torch.isin(ids, neutral_ids.to(ids.device)) & valid
    G = global_rows if global_rows is not None else B
    g = step_generator(seed, step, salt=2)
    u_text = torch.rand(G, T, generator=g)[row_offset:row_offset + B].to(ids.device)
    u_img = torch.rand(G, k, generator=g)[row_offset:row_offset + B].to(ids.device)
    u_pos = torch.rand(max(1, cfg.n_pos_views), G, generator=g)[:, row_offset:row_offset + B].to(ids.device)
    u_neg = torch.rand(max(1, cfg.n_hard_views), G, generator=g)[:, row_offset:row_offset + B].to(ids.device)
    tp, tn, tch = text_views(s_l, valid, am, float(teacher.tau_l), drop=cfg.text_pos_drop, u=u_text,
                             margin=cfg.threshold_margin, neutral=neutral_t)
    ip, ineg, ich = image_views(s_v, seg, k, float(teacher.tau_v), drop=cfg.img_pos_drop, u=u_img,
                                margin=cfg.threshold_margin)
    return Views(tp, tn, tch, ip, ineg, ich, valid, seg, text_pos_changed=(valid & ~tp).any(1),
                 img_pos_changed=(~ip).any(1), pos_side_u=u_pos, neg_side_u=u_neg)


# --------------------------------------------------------------------------- mining

class Miner:
    """Offline hard-negative mining over a pool of training pairs.

    `refresh(model)` embeds the pool (each rank a strided share, gathered) into a
    `solar_kernels.Index`; `neighbours(f, self_ids, k)` returns, for each row's current
    embedding f, the stored embeddings of its k nearest pool pairs other than itself
    (self_ids: the row's pool id, or -1 when the pair is not in the pool)."""

    def __init__(self, pool, pool_ids: torch.Tensor, *, dtype: str = "fp32", chunk: int = 256,
                 exclude_top: int = 0):
        self.pool = pool                       # a PairBank
        self.pool_ids = pool_ids.long()        # bank indices that make the pool
        self.dtype = dtype
        self.chunk = chunk
        self.exclude_top = exclude_top
        self.bank: Optional[torch.Tensor] = None
        self.index = None
        self.refreshed_at = -1
        # bank index -> pool row, and sample key -> pool row (streaming data identifies pairs by key)
        self._pos = {int(b): i for i, b in enumerate(self.pool_ids.tolist())}
        keys = pool.fields.get("key") if pool is not None and hasattr(pool, "fields") else None
        self._key_pos = {keys[int(b)]: i for i, b in enumerate(self.pool_ids.tolist())} if keys else {}

    def pool_rows(self, bank_index: torch.Tensor) -> torch.Tensor:
        """Pool row of each bank index (-1 when not in the pool)."""
        return torch.tensor([self._pos.get(int(b), -1) for b in bank_index.tolist()], dtype=torch.long)

    def self_rows(self, batch: dict) -> torch.Tensor:
        """Pool row of each pair of `batch` (by bank_index, else by key; -1 when not in the pool)."""
        if "bank_index" in batch:
            return self.pool_rows(batch["bank_index"].cpu())
        if "key" in batch:
            return torch.tensor([self._key_pos.get(k, -1) for k in batch["key"]], dtype=torch.long)
        return torch.full((batch["input_ids"].shape[0],), -1, dtype=torch.long)

    @torch.no_grad()
    def refresh(self, model, step: int, dist_info: Optional[DistInfo] = None) -> None:
        """Re-embed the pool with `model` and rebuild the index."""
        di = dist_info or get_dist()
        was_training = model.training
        model.eval()
        mine = torch.arange(di.rank, len(self.pool_ids), di.world)
        parts = []
        for s in range(0, len(mine), self.chunk):
            b = batch_to(self.pool.rows(self.pool_ids[mine[s:s + self.chunk]]), di.device)
            parts.append(model.embed(b).float().cpu())
        local = torch.cat(parts) if parts else torch.zeros(0, model.cfg.embed_dim)
        if di.enabled:
            import torch.distributed as dist
            n = len(self.pool_ids)
            per = -(-n // di.world)
            pad = torch.zeros(per, local.shape[1])
            pad[:len(local)] = local
            pad = pad.to(di.device)
            out = [torch.zeros_like(pad) for _ in range(di.world)]
            dist.all_gather(out, pad)
            bank = torch.zeros(n, local.shape[1])
            for r, o in enumerate(out):
                cnt = len(range(r, n, di.world))
                bank[r::di.world] = o[:cnt].cpu()
        else:
            bank = local
        model.train(was_training)
        self.set_bank(bank, step)

    def set_bank(self, bank: torch.Tensor, step: int) -> None:
        """Install pool embeddings (e.g. restored from a checkpoint) and build the index."""
        self.bank = bank.float().contiguous()
        self.index = sk.Index(self.bank.shape[1], dtype=self.dtype)
        self.index.add(self.bank)
        self.refreshed_at = int(step)

    @torch.no_grad()
    def neighbours(self, f: torch.Tensor, self_rows: torch.Tensor, k: int) -> torch.Tensor:
        """[N, k, E] stored embeddings of each row's k nearest pool pairs (self excluded)."""
        if self.index is None:
            raise RuntimeError("Miner.neighbours: call refresh() first")
        want = min(len(self.pool_ids), k + 1 + self.exclude_top)
        if want < k + 1:
            raise ValueError(f"mine_k: {k} neighbours need a pool of at least {k + 1} pairs, have {len(self.pool_ids)}")
        _, ids = self.index.search(f.detach().float().cpu().contiguous(), want)
        ids = ids.long()
        keep = ids != self_rows[:, None]
        # drop self, then the first `exclude_top` others, take k
        rank = keep.long().cumsum(1)
        sel = keep & (rank > self.exclude_top) & (rank <= self.exclude_top + k)
        chosen = ids[sel].view(len(ids), k)
        return self.bank[chosen].to(f.device, f.dtype)


# --------------------------------------------------------------------------- loss

class Stage2Loss(nn.Module):
    """Stage 2's loss on one batch: views -> E_VL -> multi-positive InfoNCE.

    forward(batch, step) -> (loss, metrics); `model` is trained, `teacher` frozen."""

    def __init__(self, model, teacher, cfg: Stage2Config, *, seed: int, miner: Optional[Miner] = None,
                 dist_info: Optional[DistInfo] = None, neutral_ids: Optional[torch.Tensor] = None):
        super().__init__()
        self.neutral_ids = neutral_ids
        self.model = model
        self.teacher = teacher
        self.cfg = cfg
        self.seed = seed
        self.miner = miner
        self.dist_info = dist_info or get_dist()

    def embed(self, batch: dict) -> dict:
        """The adapted patch and text tokens of `batch` (the part a micro-batched step splits)."""
        return {"v": self.model.patch_tokens(batch["pixel_values"]),
                "t": self.model.text_tokens(batch["input_ids"], batch["attention_mask"])}

    def forward(self, batch: dict, step: int):
        """(loss, metrics) of `batch` at optimizer step `step`."""
        return self.loss_from(batch, self.embed(batch), step)

    def loss_from(self, batch: dict, tokens: dict, step: int):
        """The stage-2 loss of `batch` given its tokens (see `embed`): views, E_VL, InfoNCE."""
        cfg, di = self.cfg, self.dist_info
        B = batch["input_ids"].shape[0]
        views = build_views(self.teacher, batch, cfg, seed=self.seed, step=step, row_offset=di.rank * B,
                            global_rows=B * di.world, neutral_ids=self.neutral_ids)
        m = self.model
        v, t = tokens["v"], tokens["t"]
        valid = views.text_valid
        rows = [m.fuse(v, t, None, valid)]
        for j in range(cfg.n_pos_views):
            pk, tk = views.positive(j)
            rows.append(m.fuse(v, t, pk, tk))
        z = torch.cat(rows)                                            # [(1+n_pos) B, E]
        R = len(rows)
        groups = (torch.arange(B, device=z.device) + di.rank * B).repeat(R)
        hn = []
        anchor = rows[0].detach()
        for h in range(cfg.n_hard_views):
            pk, tk, changed = views.hard_negative(h)
            f = m.fuse(v, t, pk, tk)
            hn.append(torch.where(changed[:, None], f, -anchor))
        n_views = len(hn)
        metrics = {}
        if self.miner is not None and cfg.mine_k > 0:
            self_rows = self.miner.self_rows(batch)
            mined = self.miner.neighbours(rows[0], self_rows, cfg.mine_k)      # [B, k, E]
            hn += list(mined.unbind(1))
            metrics["mined_sim"] = (mined * rows[0].detach()[:, None]).sum(-1).mean()
        hard = torch.stack(hn, 1).repeat(R, 1, 1) if hn else None          # [R B, H, E]
        loss = sk.contrastive_loss(z, groups=groups, hard_negatives=hard, temperature=cfg.temperature,
                                   hardness=cfg.hardness, process_group=di.group)
        with torch.no_grad():
            a = rows[0]
            metrics["pos_sim"] = torch.stack([(a * r).sum(-1).mean() for r in rows[1:]]).mean() \
                if R > 1 else 1.0
            if n_views:
                metrics["hardview_sim"] = torch.stack([(a * x).sum(-1).mean() for x in hn[:n_views]]).mean()
            metrics["text_pos_hidden"] = ((valid & ~views.text_pos).sum(1).float()
                                          / valid.sum(1).clamp_min(1)).mean()
            metrics["img_pos_hidden"] = (~views.img_pos).float().mean()
            metrics["img_neg_hidden"] = (~views.img_neg).float().mean()
        return loss, metrics


# --------------------------------------------------------------------------- driver

def run_stage2(model, data, cfg: Stage2Config, *, out_dir: str, resume: bool = False, log=None, seed: int = 0,
               dist_info: Optional[DistInfo] = None, teacher=None, ckpt_every: int = 100, log_every: int = 10,
               progress: bool = True, pool=None, options=None, select_score=None) -> dict:
    """Train `model` (initialised from stage 1) with stage 2's loss for cfg.steps steps.

    data: a `PairBank` (the mining pool is a seeded subset of it) or a `StreamBatches`
    (then `pool` is the mining pool: a `solar.mining.PoolSource`, mined through an
    `EmbeddingPool` that holds embeddings only, or a PairBank of training pairs with keys;
    without one, mining is off and no caption token is neutral).  The neutral (never hidden)
    caption tokens are those in more than cfg.text_neutral_df of the pool's captions.
    The frozen teacher is a copy of `model` taken now (or the given one).  Checkpoints in
    {out_dir}/ckpt; options: `solar.trainer.LoopOptions`.  With cfg.ema_decay > 0 the weights
    left in `model` at the end are the exponential moving average of its weights over the run
    (`solar.averaging`; mining re-embeds the pool with the current, not the averaged, weights).
    With cfg.select_every > 0 and a `select_score(model) -> float` (the validation Avg, see
    `solar.train`), the model is scored every select_every steps and after the last, and the
    best-scoring snapshot is what `model` holds at the end (`solar.selection`; without
    `select_score` selection is off).  Returns the loop's summary dict."""
    di = dist_info or get_dist()
    if teacher is None:
        teacher = copy.deepcopy(model)
    teacher.eval().requires_grad_(False)
    validate_config(cfg)   # fields may have been set after construction
    miner = None
    if pool is None and hasattr(data, "rows") and hasattr(data, "__len__"):
        pool = data
    streamed = isinstance(pool, PoolSource)
    if cfg.mine_k > 0 and streamed:
        miner = EmbeddingPool(pool, dtype=cfg.mine_dtype, exclude_top=cfg.mine_exclude_top, dist_info=di,
                              progress=progress)
    elif cfg.mine_k > 0 and pool is not None:
        g = torch.Generator().manual_seed(seed + 17)
        n_pool = len(pool) if cfg.mine_pool_size <= 0 else min(cfg.mine_pool_size, len(pool))
        pool_ids = torch.randperm(len(pool), generator=g)[:n_pool].sort().values
        miner = Miner(pool, pool_ids, dtype=cfg.mine_dtype, exclude_top=cfg.mine_exclude_top)
    neutral_ids = None
    fields = getattr(pool, "fields", None)
    if streamed:
        # one caption-only pass over the pool, each rank its share, counts summed
        neutral_ids = pool_frequent_token_ids(pool, teacher.text_valid_mask, cfg.text_neutral_df, di)
    elif cfg.text_neutral_df > 0 and fields is not None and "input_ids" in fields:
        # document frequencies over the training pool (every rank sees the same pool: same ids)
        ids, am = fields["input_ids"], fields["attention_mask"]
        valid = torch.cat([teacher.text_valid_mask(ids[s:s + 65536], am[s:s + 65536]).cpu()
                           for s in range(0, len(ids), 65536)])       # in chunks: a large pool on a GPU
        neutral_ids = frequent_token_ids(ids, valid, cfg.text_neutral_df)
    loss_mod = Stage2Loss(model, teacher, cfg, seed=seed, miner=miner, dist_info=di, neutral_ids=neutral_ids)

    def on_step(step):
        if miner is None:
            return
        due = miner.refreshed_at < 0 or step - miner.refreshed_at >= cfg.refresh_every
        if due or miner.index is None:
            at = miner.refreshed_at
            miner.refresh(model, step, di)
            if not due:   # a resumed streamed pool whose shares could not be restored: same schedule
                miner.refreshed_at = at

    def extra_state():
        if miner is None or miner.index is None:
            return {}, {}
        if streamed:   # the embeddings are in the ranks' own files (rank_state)
            return {"refreshed_at": miner.refreshed_at}, {}
        return {"refreshed_at": miner.refreshed_at}, {"mining_bank": miner.bank}

    def restore_extra(ex, tensors):
        if miner is not None and "mining_bank" in tensors:
            miner.set_bank(tensors["mining_bank"], ex["refreshed_at"])
        elif streamed and miner is not None and "refreshed_at" in ex:
            miner.refreshed_at = int(ex["refreshed_at"])

    # streamed pool: each rank checkpoints its own share of the embeddings and restores it, so a
    # resumed run mines from the bank the interrupted run had (not one embedded by resumed weights)
    pool_state = dict(rank_state=miner.save_state, restore_rank_state=miner.restore) \
        if streamed and miner is not None else {}

    phase = Phase(name="stage2", model=model, loss=loss_mod, data=data, steps=cfg.steps, global_batch=cfg.batch_size,
                  optim=OptimSpec(lr=cfg.lr, warmup=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                                  grad_clip=cfg.grad_clip, min_lr_ratio=cfg.min_lr_ratio),
                  ckpt_every=ckpt_every, log_every=log_every, on_step=on_step, extra_state=extra_state,
                  restore_extra=restore_extra, **pool_state)
    options = options or LoopOptions()
    options = dataclasses.replace(options, progress=progress and options.progress)
    # the model stage 2 returns is the average of its weights when cfg.ema_decay > 0
    ema = attach_ema(phase, cfg.ema_decay) if cfg.ema_decay > 0 else None
    # ... or the best of its snapshots on the validation benchmark when cfg.select_every > 0
    sel = attach_selection(phase, select_score, cfg.select_every, di) \
        if cfg.select_every > 0 and select_score is not None else None
    summary = train_loop(phase, out_dir=out_dir, resume=resume, log=log, dist_info=di, options=options)
    if ema is not None:
        ema.copy_to(model)
    if sel is not None:
        sel.copy_to(model)
        summary = {**summary, "selected_step": sel.step, "selected_score": sel.score}
    return summary
