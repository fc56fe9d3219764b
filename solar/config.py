"""The training configuration: every config dataclass and one table of named presets.

`TrainConfig` composes `ModelConfig` (the architecture), `Stage1Config`, `Stage2Config` and
the data / evaluation / baseline / run settings; `PRESETS` maps a preset name to the values it
changes in each section, and `get_preset` builds a fresh `TrainConfig` from it.  The CLI that
maps flags onto these dataclasses is `solar.cli`; the option machinery (`option`, checks,
dict round trip) is `solar.options`.  This module imports nothing else from solar, so the
model, the stages and the trainer all import their config from here.

Values the paper does not give (temperatures, schedules, segment counts, ...) are
our choices; each class's docstring says so.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .options import (ConfigError, check_fields, config_from_dict, config_to_dict, option, show_choices,
                      validate_config)

__all__ = [
    "ModelConfig", "Stage1Config", "Stage2Config", "DataConfig", "EvalConfig", "BaselineConfig", "RunConfig",
    "TrainConfig", "PRESETS", "INDEX_DTYPES", "TEACHERS", "QDA_MODES", "RHO_SCHEDULES", "RUN_STAGES",
    "PRECISIONS", "ConfigError", "option", "check_fields", "validate_config", "get_preset", "config_to_dict",
    "config_from_dict",
]

INDEX_DTYPES = ("fp32", "fp16", "int8")   # storage dtypes of solar_kernels.Index


def _section_preset(name: str, section: str) -> dict:
    """The overrides preset `name` gives section `section` (ValueError for an unknown preset)."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name].get(section, {}))


@dataclass
class ModelConfig:
    """Everything that fixes the model's architecture (saved as ``config.json``).

    Tower fields (``vision_*``, ``text_*``) are used only when the tower is built from scratch;
    with ``vision_pretrained`` / ``text_pretrained`` set (a local directory or a hub name such as
    ``openai/clip-vit-base-patch16``) the tower's own config wins and is recorded in
    ``vision_tower_config`` / ``text_tower_config`` so that a saved SOLAR checkpoint is rebuilt
    without touching the hub.
    """

    preset: str = option("tiny", "the model preset this config was built from")
    # --- vision tower E_V (CLIPVisionConfig fields) ---
    image_size: int = option(64, "input image side in pixels")
    patch_size: int = option(16, "ViT patch side in pixels ((image_size / patch_size)^2 patches)")
    vision_hidden: int = option(96, "hidden size of a from-scratch vision tower")
    vision_layers: int = option(0, "transformer layers of a from-scratch vision tower (0: embeddings + norms)")
    vision_heads: int = option(4, "attention heads of a from-scratch vision tower")
    vision_mlp: int = option(192, "MLP size of a from-scratch vision tower")
    vision_pretrained: Optional[str] = option(None, "pretrained vision tower (CLIP, SigLIP, DINOv2): local folder "
                                                    "written by save_pretrained, or hub name (none: from scratch)")
    # --- text tower E_L (CLIPTextConfig fields) ---
    vocab_size: int = option(512, "vocabulary size of a from-scratch text tower (set from the tokenizer)")
    max_text_len: int = option(64, "maximum caption length in tokens")
    text_hidden: int = option(96, "hidden size of a from-scratch text tower")
    text_layers: int = option(0, "transformer layers of a from-scratch text tower (0: embeddings + norms)")
    text_heads: int = option(4, "attention heads of a from-scratch text tower")
    text_mlp: int = option(192, "MLP size of a from-scratch text tower")
    bos_token_id: int = option(0, "begin-of-text token id (set from the tokenizer)")
    eos_token_id: int = option(1, "end-of-text token id (set from the tokenizer)")
    pad_token_id: int = option(1, "padding token id (set from the tokenizer)")
    text_pretrained: Optional[str] = option(None, "pretrained text tower (CLIP, SigLIP, BERT / XLM-R such as "
                                                  "BGE-m3): local folder or hub name (none: from scratch)")
    # CLIP's text tower is causal.  Pretrained CLIP keeps that; the from-scratch `tiny` tower
    # drops it (our choice): with a causal mask the first words of "a small red circle at top
    # left" cannot know which object they describe, which caps the text-side mask quality.
    text_causal: bool = option(False, "causal attention in the text tower (pretrained CLIP: true)")
    # local phrase context for per-position (layer-free) text towers: a residual 1-D convolution
    # over this many neighbouring token states (odd; 0 = off) between E_L and A_L.  See
    # ``LocalContext`` for why (stage-1 text masks need phrase context, not whole-caption context).
    text_context_window: int = option(0, "odd window of a residual 1-D convolution giving text tokens phrase "
                                         "context (0: off)")
    # the same for patches: a residual k x k convolution over the patch grid (odd; 0 = off)
    vision_context_window: int = option(0, "odd k of a residual k x k convolution over the patch grid (0: off)")
    # s_L at phrase level: words that end a phrase (conjunctions, punctuation); each token's
    # local feature is the mean over its phrase (see ``SolarModel.text_segments``).  Empty: per
    # token.  ``with_tokenizer`` resolves them to ``text_segment_ids`` (single-token words only).
    text_segment_words: list = option([], "comma-separated words that end a phrase; s_L is scored per phrase "
                                          "(empty: per token)")
    text_segment_ids: list = option([], "token ids of text_segment_words (resolved from the tokenizer)")
    # --- adapters, fusion encoder, head ---
    width: int = option(96, "shared width W of the adapted tokens and of E_VL")
    adapter_hidden: int = option(192, "hidden size of the two-layer adapters A_V / A_L")
    fusion_layers: int = option(3, "attention layers of the fusion encoder E_VL (the paper: 3)")
    fusion_heads: int = option(4, "attention heads of E_VL (must divide width)")
    fusion_mlp: int = option(192, "MLP size of E_VL")
    embed_dim: int = option(96, "E, the size of the pair embedding (the paper: 768)")
    dropout: float = option(0.0, "dropout rate of the adapters, E_VL and the from-scratch towers' attention")
    # --- training options ---
    freeze_vision: bool = option(False, "freeze E_V (no gradients, eval mode)")
    freeze_text: bool = option(False, "freeze E_L (no gradients, eval mode)")
    # LoRA on the towers (the paper fine-tunes E_V / E_L with LoRA; rank, alpha and targets are
    # our choices): only the adapters train; saved models have them folded in
    lora_rank: int = option(0, "LoRA rank on both towers' attention / MLP linears (0: full fine-tuning or "
                               "freezing, see freeze_*)", ge=0)
    lora_alpha: float = option(16.0, "LoRA alpha (the update is scaled by alpha / rank)", gt=0)
    lora_dropout: float = option(0.0, "dropout on the LoRA input", ge=0, le=1)
    lora_targets: list = option([], "comma-separated names of the linears to adapt (empty: every attention and "
                                    "MLP linear of the tower family, solar.towers.DEFAULT_LORA_TARGETS)")
    # image normalisation: the vision tower's own (resolved by solar.towers.image_stats from the
    # tower folder's preprocessor_config.json or its family; empty for from-scratch towers: CLIP's)
    image_mean: list = option([], "per-channel pixel mean (empty: the vision tower's own, CLIP's for a from-scratch "
                                  "tower)")
    image_std: list = option([], "per-channel pixel std (empty: as image_mean)")
    # resolved tower classes and configs (filled in when the towers are built; used by from_pretrained)
    vision_tower_class: str = option("", "transformers class of the vision tower (resolved; not a flag)")
    text_tower_class: str = option("", "transformers class of the text tower (resolved; not a flag)")
    tower_projections: bool = option(False, "both towers carry their pretrained image-text projection heads "
                                            "(resolved; the zero-shot baseline needs them)")
    vision_tower_config: Optional[dict] = option(None, "resolved config of the vision tower (not a flag)")
    text_tower_config: Optional[dict] = option(None, "resolved config of the text tower (not a flag)")

    @property
    def num_patches(self) -> int:
        """P, the number of patch tokens (image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a dict (unknown keys raise a ValueError naming them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; expected a subset of {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def preset_config(cls, name: str, **overrides) -> "ModelConfig":
        """The model section of preset `name` (see ``PRESETS``) with optional field overrides;
        an unknown preset is a ValueError naming the known ones."""
        base = _section_preset(name, "model")
        base.update(overrides)
        return cls(preset=name, **base)

    def with_tokenizer(self, tokenizer) -> "ModelConfig":
        """A copy whose vocab size and special-token ids come from a (HF-style) tokenizer."""
        vocab = len(tokenizer)
        def tid(name, fallback):
            v = getattr(tokenizer, name, None)
            return fallback if v is None else int(v)
        bos = tid("bos_token_id", tid("cls_token_id", self.bos_token_id))   # BERT: [CLS] / [SEP]
        eos = tid("eos_token_id", tid("sep_token_id", self.eos_token_id))
        pad = tid("pad_token_id", eos)
        seg = []
        for w in self.text_segment_words:
            ids = tokenizer.encode(w, add_special_tokens=False)
            if len(ids) == 1:
                seg.append(int(ids[0]))
        return dataclasses.replace(self, vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                                   text_segment_ids=sorted(set(seg)))




TEACHERS = ("none", "init")
QDA_MODES = ("mixture", "direct")
RHO_SCHEDULES = ("linear", "cosine", "step")


@dataclass
class Stage1Config:
    """Stage 1: learning the intersection masks (SOLAR.md "Stage 1").

    Each field's help (``option``; ``python -m solar.train --help``) says what it means.  The
    paper gives none of these values: they are our choices (measurements behind them:
    docs/EXPERIMENTS.md).  ``tower_lr_scale`` is 1.0 from scratch and lower when fine-tuning real
    CLIP weights; ``teacher="init"`` is meaningful with pretrained towers and is what
    ``gd_weight`` / ``ld_weight`` need.
    """

    steps: int = option(600, "optimizer steps of stage 1", ge=1)
    lr: float = option(3e-3, "AdamW peak learning rate (linear warm-up, cosine decay to 10%)", gt=0)
    tower_lr_scale: float = option(1.0, "lr multiplier for the towers E_V / E_L", ge=0)
    weight_decay: float = option(0.05, "AdamW weight decay", ge=0)
    warmup_steps: int = option(50, "linear warm-up steps", ge=0)
    grad_clip: float = option(1.0, "max global gradient norm (0 disables clipping)", ge=0)
    temperature: float = option(0.07, "InfoNCE temperature of both masked ITC losses", gt=0)
    gla_margin: float = option(0.2, "delta, the margin of the GLA hinge")
    gla_weight: float = option(1.0, "lambda1, weight of L_GLA", ge=0)
    itc_weight: float = option(1.0, "weight of the pooled masked ITC", ge=0)
    fusion_itc_weight: float = option(1.0, "weight of the masked ITC through E_VL (0 leaves E_VL untrained)", ge=0)
    gd_weight: float = option(0.0, "lambda2, weight of the global distillation L_GD (needs teacher init)", ge=0)
    ld_weight: float = option(0.0, "lambda3, weight of the local distillation L_LD (needs teacher init)", ge=0)
    teacher: str = option("none", "distillation teacher: none, or init (frozen copies of the towers as stage 1 "
                                  "starts)", choices=TEACHERS)
    qda_momentum: float = option(0.05, "EMA momentum of the QDA Gaussian statistics", gt=0, le=1)
    qda_mode: str = option("mixture", "QDA threshold: mixture (intersection component of the true-pair "
                                      "similarities vs negatives) or direct (whole true-pair Gaussian vs "
                                      "negatives)", choices=QDA_MODES)
    rho_schedule: str = option("linear", "how rho of the evolutionary mask goes 1 -> 0", choices=RHO_SCHEDULES)
    rho_hold_frac: float = option(0.3, "rho stays 1 for this fraction of the steps", ge=0, le=1)
    rho_end_frac: float = option(1.0, "rho reaches 0 at this fraction of the steps and stays there", ge=0, le=1)
    log_every: int = option(20, "steps between metric dicts passed to `log`", ge=1)
    eval_every: int = option(200, "steps between mask-IoU evaluations (0: only at the end)", ge=0)
    eval_batches: int = option(8, "batches per mask-IoU evaluation (0: all)", ge=0)
    ckpt_every: int = option(200, "steps between checkpoints in out_dir/stage1_ckpt (0: only at the end)", ge=0)
    seed: int = option(0, "seed of the torch RNG used in stage 1")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Stage1Config":
        """The stage-1 section of preset `name` (see ``PRESETS``) with optional field overrides;
        an unknown preset is a ValueError naming the known ones."""
        return cls(**{**_section_preset(name, "stage1"), **overrides})

    def __post_init__(self):
        check_fields(self)
        if not self.rho_hold_frac <= self.rho_end_frac:
            raise ConfigError(type(self).__name__, "rho_hold_frac", f"must be <= rho_end_frac ({self.rho_end_frac}), "
                              f"got {self.rho_hold_frac}")
        for name in ("gd_weight", "ld_weight"):
            if getattr(self, name) and self.teacher == "none":
                raise ConfigError(type(self).__name__, name, f"needs teacher 'init' (distillation from the initial "
                                  f"towers), got {getattr(self, name)} with teacher 'none'")




@dataclass
class Stage2Config:
    """Stage 2: self-supervised multimodal embedding learning (SOLAR.md "Stage 2").

    The stage-1 model and its thresholds tau_V, tau_L turn each unlabeled pair into views
    (see `solar.stage2`):
    - positive views hide redundant content: some intersection tokens (s_L > tau_L) of
      the caption, and whole image segments whose mean s_V is above tau_V; what they
      hide is still present in the other modality, so the pair still means the same item;
    - the hard-negative view hides the differences: every caption token with
      s_L <= tau_L and every segment with mean s_V <= tau_V; that content exists only
      there, so the view means a different, poorer item;
    - neutral positions (function words by document frequency, low-norm background patches)
      are hidden by no view: they are neither intersection nor difference content.
    The loss is SOLAR's multi-positive InfoNCE over in-batch negatives, the constructed
    hard negatives and offline-mined nearest neighbours (re-mined every `refresh_every`
    steps).  Numeric values are our choices (the paper gives none).

    Choose values on the validation benchmark (data.val_bench), never on the test one; the
    measurements behind the defaults are in docs/EXPERIMENTS.md.  ``select_every`` (the
    ``tiny`` preset: 50) returns the best of stage 2's snapshots on that benchmark instead of
    the last one: its validation Avg peaks and then falls back by an amount the float
    rounding decides (early stopping; `solar.selection`).
    """

    steps: int = option(300, "optimizer steps of stage 2", ge=1)
    batch_size: int = option(64, "pairs per step (global batch over all ranks)", ge=1)
    lr: float = option(3e-4, "AdamW peak learning rate (linear warm-up, cosine decay)", gt=0)
    min_lr_ratio: float = option(0.1, "final lr = lr * min_lr_ratio", ge=0, le=1)
    warmup_steps: int = option(20, "linear warm-up steps", ge=0)
    weight_decay: float = option(0.05, "AdamW weight decay", ge=0)
    grad_clip: float = option(1.0, "max global gradient norm; <= 0 disables clipping")
    temperature: float = option(0.05, "eta, the temperature of the multi-positive InfoNCE", gt=0)
    text_pos_drop: float = option(0.8, "share of intersection tokens hidden in a text positive view", ge=0, le=1)
    text_min_keep: int = option(1, "tokens a view always keeps (never hide every token)", ge=0)
    n_segments: int = option(8, "k of the k-means over the non-neutral patch features (+ position)", ge=1)
    kmeans_iters: int = option(5, "Lloyd iterations of that k-means", ge=1)
    position_weight: float = option(1.0, "weight of the (row, col) coordinates in the clustering features", ge=0)
    img_pos_drop: float = option(0.8, "probability to hide each above-tau_V segment in an image positive view",
                                 ge=0, le=1)
    n_pos_views: int = option(2, "positive views per pair besides the full pair (one E_VL pass each)", ge=1)
    n_hard_views: int = option(1, "constructed hard-negative views per pair (one pass each; 0 disables)", ge=0)
    mine_k: int = option(8, "offline-mined hard negatives per pair (0 disables mining)", ge=0)
    mine_exclude_top: int = option(0, "skip the first j mined neighbours (guard against near-duplicates)", ge=0)
    refresh_every: int = option(100, "R: re-embed the pool and re-mine every R steps", ge=1)
    mine_pool_size: int = option(4096, "training pairs embedded for mining (<= 0: all)")
    mine_dtype: str = option("fp32", "solar_kernels.Index dtype used for mining", choices=INDEX_DTYPES)
    hardness: float = option(0.5, "beta of contrastive_loss: weight on hard negatives (0 = plain InfoNCE)", ge=0)
    threshold_margin: float = option(0.0, "views use s > tau + margin (intersection) and s <= tau - margin "
                                          "(difference)")
    # neutral positions, never hidden by any view (our addition, see solar.stage2): caption tokens
    # in more than this share of the training captions (function words) ...
    text_neutral_df: float = option(0.7, "caption tokens in more than this share of the training captions are "
                                         "neutral, hidden by no view (<= 0 or >= 1: none)")
    # ... and patches whose adapted token norm is below this share of the largest in their image
    # (they add ~nothing to the global image embedding: flat background)
    img_neutral_ratio: float = option(0.25, "patches whose adapted token norm is below this share of their "
                                            "image's largest are neutral (0: none)", ge=0, le=1)
    init_from_stage1: bool = option(True, "start from the stage-1 weights (the paper does); false: fresh init")
    ema_decay: float = option(0.0, "the final stage-2 model is the exponential moving average of its weights "
                                   "with this decay per step, started at the stage-1 weights (0: the last "
                                   "step's weights)", ge=0, le=0.9999)
    select_every: int = option(0, "score the model on the validation benchmark (data.val_bench) every this many "
                                  "steps and after the last, and keep the best snapshot as the stage-2 model "
                                  "(0: the last step's model)", ge=0)

    def __post_init__(self):
        check_fields(self)
        if self.select_every and self.ema_decay:
            raise ConfigError(type(self).__name__, "select_every", f"selects among the raw snapshots and cannot be "
                              f"combined with ema_decay ({self.ema_decay}); set one of them to 0")


@dataclass
class DataConfig:
    """Where the training pairs and the benchmark come from."""

    cache_dir: str = option("./.solar_cache", "folder where ShapesWorld and the benchmarks are generated if absent")
    train_shards: str = option("", "webdataset pattern of the training shards; empty = ShapesWorld in cache_dir")
    bench_dir: str = option("", "test benchmark folder; empty = built in cache_dir")
    train_pairs: int = option(12000, "ShapesWorld pairs generated for training", ge=1)
    batch_size: int = option(64, "global batch of stage 1 and of CLIP-SF (stage 2: stage2.batch_size)", ge=1)
    shard_size: int = option(2000, "pairs per generated shard", ge=1)
    bench_triplets: int = option(200, "benchmark triplets (the paper: 214)", ge=1)
    bench_pool: int = option(3000, "benchmark distractor pairs (the paper: about 1M)", ge=0)
    seed: int = option(0, "data generation seed (training items)")
    bench_seed: int = option(12345, "test benchmark build seed (items disjoint from training)")
    # validation benchmark: built like the test benchmark (same sizes and builder) from another
    # seed and a disjoint item-id range (VAL_ITEM_BASE..); every model-selection or
    # hyperparameter choice looks at it only, never at the test benchmark
    val_bench: bool = option(True, "build and evaluate the validation benchmark (for model selection)")
    val_bench_dir: str = option("", "validation benchmark folder; empty = built in cache_dir")
    val_bench_seed: int = option(777, "validation benchmark build seed (must differ from bench_seed)")
    num_workers: int = option(0, "reader worker processes per rank (0 = in-process)", ge=0)
    in_memory: bool = option(True, "decode the training pairs once and keep them in memory; false: stream shards")
    tokenizer: str = option("", "tokenizer folder, 'clip' or 'shapesworld'; empty: CLIP's BPE for a pretrained "
                                "CLIP text tower, the tower folder's own for other pretrained towers, ShapesWorld's "
                                "for a from-scratch tower")
    synthetic_ok: bool = option(False, "with pretrained towers, train / evaluate on ShapesWorld when train_shards / "
                                       "bench_dir are empty (otherwise refused: such a run says nothing about real "
                                       "data)")

    def __post_init__(self):
        check_fields(self)


@dataclass
class EvalConfig:
    """Benchmark evaluation (SOLAR.md "The benchmark and its metrics")."""

    batch_size: int = option(128, "pairs per embedding batch", ge=1)
    index_dtypes: tuple = option(("fp32", "int8"), "Index dtypes to evaluate, comma-separated (each reported)",
                                 choices=INDEX_DTYPES)
    run: bool = option(True, "evaluate on the benchmark at the end of `solar.train`")

    def __post_init__(self):
        check_fields(self)
        if not self.index_dtypes:
            raise ConfigError(type(self).__name__, "index_dtypes", f"must name at least one of "
                              f"{show_choices(INDEX_DTYPES)}, got none")


@dataclass
class BaselineConfig:
    """Baselines trained on the same data with the same budget."""

    clip_sf: bool = option(True, "train and evaluate the CLIP score-fusion baseline (CLIP-SF)")
    clip_sf_steps: int = option(-1, "CLIP-SF optimizer steps; < 0: stage1.steps + stage2.steps (same budget)")
    clip_sf_lr: float = option(-1.0, "CLIP-SF peak learning rate; <= 0: stage1.lr")
    clip_sf_temperature: float = option(0.05, "InfoNCE temperature of CLIP-SF", gt=0)
    stage1_only: bool = option(True, "also evaluate the stage-1 model (the ablation)")
    zero_shot: bool = option(True, "with pretrained CLIP / SigLIP towers, also evaluate zero-shot CLIP-SF: the "
                                   "towers' own projection heads, no training")

    def __post_init__(self):
        check_fields(self)


RUN_STAGES = ("1", "2", "all")
PRECISIONS = ("fp32", "bf16")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class RunConfig:
    """Run-level settings: output, seeding, checkpoints, devices."""

    out_dir: str = option("runs/solar", "output folder: config, metrics, checkpoints, models, results")
    seed: int = option(0, "seed of model initialisation, batch order and views")
    stage: str = option("all", "what to run: stage 1, stage 2, or all (stage 1 + stage 2 + baselines + eval)",
                        choices=RUN_STAGES)
    device: str = option("auto", "'auto' (cuda:<local_rank> when available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    resume: bool = option(False, "continue from out_dir's latest checkpoints")
    ckpt_every: int = option(100, "steps between stage-2 / CLIP-SF checkpoints (0: none)", ge=0)
    log_every: int = option(10, "steps between JSONL metric lines", ge=1)
    num_threads: int = option(0, "torch CPU threads; 0 = leave as is", ge=0)
    deterministic: bool = option(True, "torch.use_deterministic_algorithms (warn only) and fixed seeds")
    progress: bool = option(True, "tqdm progress bars (rank 0)")
    stage1_ckpt: str = option("", "stage 2 only: start from this stage-1 model folder; empty = out_dir's")
    # loop features every phase gets (solar.trainer)
    precision: str = option("fp32", "fp32, or bf16: bf16 autocast of the forward passes (and TF32 for fp32 "
                                    "matmuls on CUDA)", choices=PRECISIONS)
    activation_checkpointing: bool = option(False, "recompute the towers' and E_VL's activations in the backward "
                                                   "pass instead of keeping them")
    micro_batches: int = option(1, "split each global batch into this many micro-batches (GradCache: the "
                                   "contrastive losses stay over the whole batch)", ge=1)

    def __post_init__(self):
        check_fields(self)
        if not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError(type(self).__name__, "device",
                              f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


@dataclass
class TrainConfig:
    """Everything `python -m solar.train` needs. `preset` records which preset it came from."""

    preset: str = option("tiny", "the named preset this config started from (--preset)")
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        """Checks across sections, so that a run that cannot work stops at the command line
        (exit 2 naming the flag) instead of after its data is generated or loaded."""
        m, d, s2 = self.model, self.data, self.stage2
        if m.width % m.fusion_heads:
            raise ConfigError("model", "fusion_heads", f"must divide model.width ({m.width}), got {m.fusion_heads}")
        if m.image_size % m.patch_size:
            raise ConfigError("model", "patch_size", f"must divide model.image_size ({m.image_size}), "
                              f"got {m.patch_size}")
        if not d.train_shards:  # ShapesWorld: the number of training pairs is known now
            for owner, cfg in (("data", d), ("stage2", s2)):
                if cfg.batch_size > d.train_pairs:
                    raise ConfigError(owner, "batch_size", f"must be <= data.train_pairs ({d.train_pairs}: the "
                                      f"batch is drawn from them), got {cfg.batch_size}")
            pool = min(s2.mine_pool_size, d.train_pairs) if s2.mine_pool_size > 0 else d.train_pairs
            if s2.mine_k >= pool:
                raise ConfigError("stage2", "mine_k", f"must be smaller than the mining pool ({pool} pairs: "
                                  f"stage2.mine_pool_size / data.train_pairs), got {s2.mine_k}")
        if s2.select_every and not d.val_bench:
            raise ConfigError("stage2", "select_every", f"scores snapshots on the validation benchmark, which "
                              f"data.val_bench false turns off; got {s2.select_every} (0: keep the last step's model)")
        if not d.bench_dir and not d.val_bench_dir and d.val_bench_seed == d.bench_seed:
            raise ConfigError("data", "val_bench_seed", f"must differ from data.bench_seed ({d.bench_seed}): the "
                              f"validation benchmark would be the test benchmark")

    def check_run(self) -> None:
        """Checks of what a run would do, beyond each value's own checks (`solar.cli` calls it
        after the flags; a preset alone may leave them open): with pretrained towers the
        training shards and the benchmark must be real data (data.train_shards, data.bench_dir)
        unless data.synthetic_ok says ShapesWorld is meant.  ConfigError naming the flag."""
        m, d = self.model, self.data
        if (m.vision_pretrained or m.text_pretrained) and not d.synthetic_ok:
            if not d.train_shards:
                raise ConfigError("data", "train_shards", "is required with pretrained towers (webdataset shards "
                                  "of your image-text pairs); --data.synthetic_ok true trains on ShapesWorld instead")
            if self.run.stage == "all" and self.eval.run and not d.bench_dir:
                raise ConfigError("data", "bench_dir", "is required with pretrained towers (a benchmark folder "
                                  "built from real data, solar.benchmark); --data.synthetic_ok true evaluates on "
                                  "ShapesWorld benchmarks instead, --eval.run false skips the evaluation")

    def warnings(self, given: Optional[set] = None) -> list:
        """Settings that run but are probably not meant: warm-up longer than the phase, and
        (with `given`, the dotted fields set by flags) flags of a stage this run skips."""
        out = [f"{sec}.warmup_steps ({getattr(self, sec).warmup_steps}) > {sec}.steps ({getattr(self, sec).steps}): "
               f"the learning rate never reaches its peak" for sec in ("stage1", "stage2")
               if getattr(self, sec).warmup_steps > getattr(self, sec).steps]
        skipped = {"1": ("stage2.", "baseline."), "2": ("stage1.",)}.get(self.run.stage, ())
        for name in sorted(given or ()):
            if name.startswith(skipped):
                out.append(f"--{name} has no effect with --stage {self.run.stage}")
        return out


def _preset_config(name: str) -> TrainConfig:
    return TrainConfig(preset=name, model=ModelConfig.preset_config(name), stage1=Stage1Config.preset(name),
                       stage2=Stage2Config(**_section_preset(name, "stage2")),
                       data=DataConfig(**_section_preset(name, "data")), eval=EvalConfig(**_section_preset(name, "eval")),
                       baseline=BaselineConfig(**_section_preset(name, "baseline")),
                       run=RunConfig(**_section_preset(name, "run")))


# Named presets.  `tiny`: CPU-sized, trained from scratch on ShapesWorld: 64x64 images with
# 16x16 patches (16 patches, one per cell of ShapesWorld's 4x4 board).  Its CLIP towers have
# no transformer layers (embeddings + layer norms: per-position token encoders); all mixing
# across positions happens in E_VL.  Our choice, from measurements: towers trained from
# scratch with attention learn to copy the whole image / caption into every position (that
# maximises the mean-pooled local-to-global similarity), so s_V / s_L stop being local and
# the stage-1 masks fall below the random baseline; per-position towers keep them local.
# Pretrained towers keep their layers.  `clip-b16`: the paper's SOLAR-C shape (CLIP ViT-B/16 towers,
# 768-d embedding); its adapter/fusion sizes are our choice (the paper gives only 0.20B total).
# `dinov2-bge`: SOLAR-B+D (DINOv2-base vision at 224 px = 16 x 16 patches of 14 px, BGE-m3 text, an
# XLM-R; 768-d embedding), same stage settings.  Both fine-tune the towers with LoRA as the paper
# does (rank 16, alpha 32 on every attention / MLP linear: our choice) at the full stage-1 lr
# (tower_lr_scale 1: only the adapters train there).  Tower names are hub names: on a machine
# without the hub, point --model.vision_pretrained / --model.text_pretrained at local folders.
# `tiny` also gives each text token local phrase context (a residual 5-token convolution,
# ``text_context_window``) and scores s_L per phrase (``text_segment_words``: phrases end at
# "and" / punctuation); both measured to raise the stage-1 mask IoU (docs/EXPERIMENTS.md).
# `clip-b16`, stage 1: lower learning rates and distillation from the initial towers;
# stage 2: img_neutral_ratio off (the low-norm rule was measured on ShapesWorld's flat
# backgrounds only; pretrained ViTs put a few very high-norm tokens in an image, next to which
# most patches would count as neutral); function words (text_neutral_df) stay neutral.
def _derive(base: dict, **overrides: dict) -> dict:
    """A preset equal to `base` except the fields each section of `overrides` sets."""
    return {sec: {**base.get(sec, {}), **overrides.get(sec, {})} for sec in dict.fromkeys([*base, *overrides])}


_CLIP_B16 = {
    "model": dict(image_size=224, patch_size=16, max_text_len=77,
                  vision_pretrained="openai/clip-vit-base-patch16", text_pretrained="openai/clip-vit-base-patch16",
                  text_causal=True, width=768, adapter_hidden=1536, fusion_layers=3, fusion_heads=12,
                  fusion_mlp=3072, embed_dim=768, lora_rank=16, lora_alpha=32.0),
    "stage1": dict(steps=5000, lr=1e-4, tower_lr_scale=1.0, warmup_steps=200, temperature=0.05,
                   teacher="init", gd_weight=1.0, ld_weight=1.0, log_every=50, eval_every=500, ckpt_every=1000),
    "stage2": dict(steps=5000, batch_size=1024, lr=5e-5, warmup_steps=200, refresh_every=1000,
                   mine_pool_size=1_000_000, mine_k=8, n_segments=8, kmeans_iters=10, img_neutral_ratio=0.0,
                   mine_dtype="fp16"),   # the streamed pool: N x D fp16 (solar.mining)
    "data": dict(train_pairs=1_000_000, batch_size=1024, shard_size=10000, bench_pool=100_000, num_workers=8,
                 in_memory=False),
    "eval": dict(batch_size=512),
    "run": dict(out_dir="runs/solar-clip-b16", ckpt_every=1000, log_every=50, precision="bf16"),
}

PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "model": dict(text_context_window=5, text_segment_words=["and", ",", ".", ";"]),
        "stage2": dict(select_every=50),
    },
    "clip-b16": _CLIP_B16,
    # SOLAR-B+D: clip-b16's sizes and stage settings on other towers (bidirectional text, 14 px
    # patches, BGE-m3's longer captions) and no zero-shot baseline (no shared projection heads)
    "dinov2-bge": _derive(
        _CLIP_B16,
        model=dict(patch_size=14, max_text_len=128, vision_pretrained="facebook/dinov2-base",
                   text_pretrained="BAAI/bge-m3", text_causal=False),
        baseline=dict(zero_shot=False),
        run=dict(out_dir="runs/solar-dinov2-bge")),
}


def get_preset(name: str) -> TrainConfig:
    """A fresh TrainConfig for preset `name` (a key of PRESETS); an unknown name is a ValueError."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return _preset_config(name)
