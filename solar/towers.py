"""The unimodal towers E_V / E_L: which Hugging Face models SOLAR runs on, and their conventions.

Vision towers (``ModelConfig.vision_pretrained``: a local folder written by ``save_pretrained``):

* CLIP (``clip`` / ``clip_vision_model``): [CLS] + patches; patch states are the last hidden
  states without [CLS], through ``post_layernorm``.  Loaded as ``CLIPVisionModelWithProjection``
  so that a full CLIP folder also brings CLIP's ``visual_projection`` (the zero-shot baseline).
* SigLIP (``siglip`` / ``siglip_vision_model``): no [CLS]; every output position is a patch
  (already normalised); the pooled, shared-space embedding is the attention-pool head's.
* DINOv2 (``dinov2``, ``dinov2_with_registers``): [CLS] + register tokens + patches, normalised;
  position embeddings are interpolated, so any input size divisible by the patch (14) works.

Text towers (``text_pretrained``):

* CLIP text (causal; BOS 49406 / EOS 49407; the pooled embedding is the EOS state through
  ``text_projection``), loaded as ``CLIPTextModelWithProjection``.
* SigLIP text (bidirectional; pooled = last position through its head).
* BERT / RoBERTa / XLM-R (BGE-m3 is an XLM-R): bidirectional with a key-padding mask;
  [CLS]/<s> and [SEP]/</s> are the begin / end tokens, the pad id also sets RoBERTa's positions.

Parts of a tower that SOLAR never uses (projection heads, SigLIP's pooling head, BERT's pooler)
are kept frozen, so they neither train nor trip DistributedDataParallel.  LoRA (``peft``) is
injected into the towers' attention / MLP linears when ``lora_rank > 0``; ``merged_state_dict``
gives the weights with every LoRA delta folded in and the original parameter names, so a saved
model loads without peft.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn

from .data.tokenizer import clip_tokenizer, load_tokenizer

__all__ = ["VISION_CLASSES", "TEXT_CLASSES", "tower_class_for", "family", "build_tower", "patch_states",
           "text_states", "zero_shot_image", "zero_shot_text", "set_trainable", "apply_lora", "has_lora",
           "merged_state_dict", "image_stats", "check_tokenizer", "TokenizerMismatch", "pretrained_text_config", "hub_offline", "resolve_tokenizer", "default_tokenizer", "DEFAULT_LORA_TARGETS"]

# model classes a tower may be (a whitelist: class names come from config files)
VISION_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel", "Dinov2Model",
                  "Dinov2WithRegistersModel")
TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "SiglipTextModel", "BertModel", "RobertaModel",
                "XLMRobertaModel")
_BY_TYPE = {
    "vision": {"clip": "CLIPVisionModelWithProjection", "clip_vision_model": "CLIPVisionModelWithProjection",
               "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
               "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"},
    "text": {"clip": "CLIPTextModelWithProjection", "clip_text_model": "CLIPTextModelWithProjection",
             "siglip": "SiglipTextModel", "siglip_text_model": "SiglipTextModel", "bert": "BertModel",
             "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"},
}
_FAMILY = {"CLIPVisionModel": "clip", "CLIPVisionModelWithProjection": "clip", "SiglipVisionModel": "siglip",
           "Dinov2Model": "dinov2", "Dinov2WithRegistersModel": "dinov2", "CLIPTextModel": "clip",
           "CLIPTextModelWithProjection": "clip", "SiglipTextModel": "siglip", "BertModel": "bert",
           "RobertaModel": "bert", "XLMRobertaModel": "bert"}
# LoRA targets by family (our choice; the paper names none): every attention and MLP linear
DEFAULT_LORA_TARGETS = {"clip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
                        "siglip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
                        "dinov2": ("query", "key", "value", "dense", "fc1", "fc2", "weights_in", "weights_out"),
                        "bert": ("query", "key", "value", "dense")}
_UNUSED = ("visual_projection", "text_projection", "vision_model.head", "text_model.head", "pooler", "head")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` asks for local files only."""
    return any(os.environ.get(v, "0").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _model_type(side: str, name_or_path: str, offline: bool) -> str:
    f = os.path.join(name_or_path, "config.json")
    if os.path.isfile(f):
        with open(f) as fh:
            return str(json.load(fh).get("model_type", ""))
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=offline).model_type
    except OSError as e:
        raise FileNotFoundError(f"model.{side}_pretrained: {name_or_path!r} is not a local model folder (config.json) "
                                f"and could not be fetched ({str(e).splitlines()[0]}); download the weights elsewhere "
                                f"and point at the folder") from None


def tower_class_for(side: str, name_or_path: str, offline: bool = True) -> str:
    """The model class (a name in VISION_CLASSES / TEXT_CLASSES) that loads `name_or_path` as the
    `side` ("vision" or "text") tower, from its config's ``model_type``."""
    mt = _model_type(side, name_or_path, offline)
    cls = _BY_TYPE[side].get(mt)
    if cls is None:
        raise ValueError(f"model.{side}_pretrained: {name_or_path!r} is a {mt!r} model; supported {side} towers: "
                         f"{sorted(_BY_TYPE[side])}")
    return cls


_FAMILY_STATS = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                 "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                 "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}   # ImageNet's


def image_stats(model_cfg) -> tuple[tuple, tuple]:
    """(mean, std) that the vision tower expects pixels normalised with: ``image_mean`` /
    ``image_std`` when set, else the tower folder's ``preprocessor_config.json``, else its family's
    (CLIP, SigLIP 0.5, DINOv2 ImageNet's); CLIP's for a from-scratch tower."""
    if model_cfg.image_mean or model_cfg.image_std:
        mean, std = tuple(model_cfg.image_mean or model_cfg.image_std), tuple(model_cfg.image_std or model_cfg.image_mean)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"model.image_mean / model.image_std: expected 3 values each (std > 0), got {list(mean)} "
                             f"/ {list(std)}")
        return tuple(float(x) for x in mean), tuple(float(x) for x in std)
    path = model_cfg.vision_pretrained
    f = os.path.join(path or "", "preprocessor_config.json")
    if path and os.path.isfile(f):
        with open(f) as fh:
            pp = json.load(fh)
        if "image_mean" in pp and "image_std" in pp:
            return tuple(float(x) for x in pp["image_mean"]), tuple(float(x) for x in pp["image_std"])
    if model_cfg.vision_tower_class:   # a model rebuilt from its recorded config
        return _FAMILY_STATS[family(model_cfg.vision_tower_class)]
    if not path:
        return _FAMILY_STATS["clip"]
    return _FAMILY_STATS[family(tower_class_for("vision", path, hub_offline()))]


def family(tower_or_class) -> str:
    """"clip", "siglip", "dinov2" or "bert": the conventions a tower follows."""
    name = tower_or_class if isinstance(tower_or_class, str) else type(tower_or_class).__name__
    if name not in _FAMILY:
        raise ValueError(f"tower: unsupported model class {name!r}; expected one of {sorted(_FAMILY)}")
    return _FAMILY[name]


def _transformers_class(name: str):
    if name not in VISION_CLASSES + TEXT_CLASSES:
        raise ValueError(f"tower class: {name!r} is not one of {VISION_CLASSES + TEXT_CLASSES}")
    import transformers
    return getattr(transformers, name)


def build_tower(class_name: str, *, config: Optional[dict] = None, pretrained: Optional[str] = None,
                offline: bool = True) -> tuple[nn.Module, bool]:
    """(tower, projection loaded): from ``pretrained`` (weights read, never downloaded when
    `offline`) or rebuilt with random weights from a recorded ``config`` dict.  The flag says
    whether CLIP's projection head came with the pretrained weights (a vision-only folder has
    none; the zero-shot baseline needs them)."""
    cls = _transformers_class(class_name)
    if pretrained:
        kw = {}
        top = os.path.join(pretrained, "config.json")
        if family(class_name) == "clip" and os.path.isfile(top):
            with open(top) as fh:
                full = json.load(fh)
            if full.get("model_type") == "clip" and "projection_dim" in full:
                # a full CLIP folder: the projection width is a top-level field the sub-configs may lack
                tc = cls.config_class.from_pretrained(pretrained, local_files_only=offline)
                tc.projection_dim = int(full["projection_dim"])
                kw["config"] = tc
        tower, info = cls.from_pretrained(pretrained, local_files_only=offline, output_loading_info=True, **kw)
        bad = set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                   for k in info.get("mismatched_keys", ())}
        proj = not any(str(k).startswith(("visual_projection", "text_projection")) for k in bad)
    else:
        kw = {k: v for k, v in dict(config or {}).items()
              if k not in ("model_type", "transformers_version", "architectures", "_name_or_path")}
        tower, proj = cls(cls.config_class(**kw)), False
    return tower, proj


# ------------------------------------------------------------------------------- forward conventions

def patch_states(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch token states [B, P, D] of a vision tower, in its own convention (module docstring)."""
    fam = family(tower)
    out = tower(pixel_values=pixel_values)
    h = out.last_hidden_state
    if fam == "clip":
        return getattr(tower, "vision_model", tower).post_layernorm(h[:, 1:])
    if fam == "dinov2":
        return h[:, 1 + int(getattr(tower.config, "num_register_tokens", 0) or 0):]
    return h   # siglip: every position is a patch, post-normalised inside the tower


def text_states(tower: nn.Module, ids: torch.Tensor, am: torch.Tensor, causal: bool) -> torch.Tensor:
    """Token states [B, T, D] of a text tower.  ``causal`` applies to CLIP text only (its
    pretrained convention); the others are bidirectional with a key-padding mask."""
    fam = family(tower)
    if fam == "clip" and not causal:
        tm = getattr(tower, "text_model", tower)
        h = tm.embeddings(input_ids=ids)
        bias = torch.zeros(am.shape, dtype=h.dtype, device=h.device).masked_fill(~am, torch.finfo(h.dtype).min)
        out = tm.encoder(inputs_embeds=h, attention_mask=bias[:, None, None, :], is_causal=False)
        return tm.final_layer_norm(out.last_hidden_state)
    return tower(input_ids=ids, attention_mask=am.long()).last_hidden_state


def zero_shot_image(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's own pooled image embedding in the shared image-text space (CLIP: [CLS] through
    ``visual_projection``; SigLIP: the attention-pool head).  ValueError for towers without one."""
    fam = family(tower)
    out = tower(pixel_values=pixel_values)
    if fam == "clip" and hasattr(out, "image_embeds"):
        return out.image_embeds
    if fam == "siglip":
        return out.pooler_output
    raise ValueError(f"zero-shot: the {type(tower).__name__} vision tower has no image-text projection head")


def zero_shot_text(tower: nn.Module, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    """The tower's own pooled text embedding in the shared space (CLIP: the EOS state through
    ``text_projection``; SigLIP: its head).  ValueError for towers without one."""
    fam = family(tower)
    out = tower(input_ids=ids, attention_mask=am.long())
    if fam == "clip" and hasattr(out, "text_embeds"):
        return out.text_embeds
    if fam == "siglip":
        return out.pooler_output
    raise ValueError(f"zero-shot: the {type(tower).__name__} text tower has no image-text projection head")


# ------------------------------------------------------------------------------- training state

def _unused(name: str) -> bool:
    return name.startswith(_UNUSED)


def has_lora(tower: nn.Module) -> bool:
    """True when LoRA adapters are injected into `tower`."""
    return any("lora_" in n for n, _ in tower.named_parameters())


def set_trainable(tower: nn.Module, trainable: bool) -> None:
    """Freeze the tower, or make it trainable: only its LoRA parameters when it has LoRA, else
    everything but the parts SOLAR never uses (projection / pooling heads)."""
    lora = has_lora(tower)
    for n, p in tower.named_parameters():
        p.requires_grad_(bool(trainable) and (("lora_" in n) if lora else not _unused(n)))


def apply_lora(tower: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=()) -> list:
    """Inject LoRA (``peft``) of `rank` / `alpha` into the tower's linears whose last name is in
    `targets` (empty: ``DEFAULT_LORA_TARGETS`` of its family), leaving out the unused heads;
    returns the adapted module names.  ImportError says how to install peft."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("model.lora_rank > 0 needs the `peft` package (pip install peft, with the torch "
                          "constraint)") from e
    targets = tuple(targets) or DEFAULT_LORA_TARGETS[family(tower)]
    names = [n for n, m in tower.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and not _unused(n)]
    if not names:
        raise ValueError(f"model.lora_targets: none of {list(targets)} names a linear layer of the "
                         f"{type(tower).__name__} tower")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names), tower)
    return names


def merged_state_dict(module: nn.Module) -> dict:
    """``module.state_dict()`` with every LoRA layer's delta folded into its base weight and
    peft's names undone (``x.base_layer.weight`` -> ``x.weight``; no ``lora_`` entries): the state
    dict of the same model without LoRA.  The live model is not changed."""
    state = module.state_dict()
    out = {k: v for k, v in state.items() if "lora_" not in k}
    for name, m in module.named_modules():
        if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer") and "default" in getattr(m, "lora_A", {}):
            key = f"{name}.base_layer.weight"
            with torch.no_grad():
                out[key] = out[key] + m.get_delta_weight("default").to(out[key].dtype)
    return {k.replace(".base_layer.", "."): v for k, v in out.items()}


# ------------------------------------------------------------------------------- tokenizers

def _tower_special(tc) -> dict:
    return {k: getattr(tc, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


class TokenizerMismatch(ValueError):
    """A tokenizer that does not fit the pretrained text tower it would feed."""


def pretrained_text_config(model_cfg):
    """(tower class name, tower config) of model_cfg.text_pretrained, read without its weights."""
    cls_name = tower_class_for("text", model_cfg.text_pretrained, hub_offline())
    cls = _transformers_class(cls_name)
    return cls_name, cls.config_class.from_pretrained(model_cfg.text_pretrained, local_files_only=hub_offline())


def check_tokenizer(tokenizer, text_tower: Optional[nn.Module] = None, *, config=None, class_name: str = "") -> None:
    """Refuse a tokenizer that does not match a pretrained text tower: more ids than the tower's
    vocabulary, or other special ids (CLIP: BOS / EOS, which its pooling and our content masks
    rely on; CLIP configs that say EOS = 2 are the legacy form whose pooling takes the largest id,
    so BOS / EOS must then be the last two ids; BERT / XLM-R: BOS ([CLS] / <s>), EOS ([SEP] / </s>)
    and the pad id, which also sets RoBERTa's position ids).  The tower is a loaded module, or its
    `config` and `class_name` (`pretrained_text_config`: checked before any weight is read).
    TokenizerMismatch (a ValueError) naming both sides."""
    tc = text_tower.config if text_tower is not None else config
    class_name = type(text_tower).__name__ if text_tower is not None else class_name
    fam = family(class_name)
    n, vocab = len(tokenizer), int(tc.vocab_size)
    name = type(getattr(tokenizer, "tokenizer", tokenizer)).__name__

    def tid(attr, alt=None):
        v = getattr(tokenizer, attr, None)
        if v is None and alt:
            v = getattr(tokenizer, alt, None)
        return None if v is None else int(v)

    problems = []
    if n > vocab:
        problems.append(f"{n} token ids > the tower's vocab_size {vocab}")
    if fam == "clip":
        want_bos, want_eos = tc.bos_token_id, tc.eos_token_id
        if want_eos == 2:   # legacy CLIP config: pooling takes argmax(ids), i.e. the largest id
            want_bos, want_eos = vocab - 2, vocab - 1
        if n != vocab:
            problems.append(f"{n} token ids != the tower's vocab_size {vocab}")
        checks = [("bos", tid("bos_token_id"), want_bos), ("eos", tid("eos_token_id"), want_eos)]
    else:
        sp = _tower_special(tc)
        checks = [("bos", tid("bos_token_id", "cls_token_id"), sp["bos_token_id"]),
                  ("eos", tid("eos_token_id", "sep_token_id"), sp["eos_token_id"]),
                  ("pad", tid("pad_token_id"), sp["pad_token_id"])]
    for what, have, want in checks:
        if want is not None and have != int(want):
            problems.append(f"{what} id {have} != the tower's {int(want)}")
    if problems:
        raise TokenizerMismatch(f"data.tokenizer: the tokenizer ({name}) does not match the pretrained "
                         f"{class_name} text tower: {'; '.join(problems)}.  Give the tower's own "
                         f"tokenizer (--data.tokenizer FOLDER; empty: CLIP's BPE for CLIP text towers, the tower "
                         f"folder's tokenizer otherwise)")


def default_tokenizer(model_cfg, tokenizer: str = ""):
    """The tokenizer a run uses: `tokenizer` (a folder, "clip" or "shapesworld") when given; else
    CLIP's exact BPE for a pretrained CLIP text tower, the tower folder's own tokenizer for other
    pretrained text towers, and the ShapesWorld BPE for a from-scratch tower."""
    n = model_cfg.max_text_len
    if tokenizer:
        return load_tokenizer(tokenizer, model_max_length=n)
    path = model_cfg.text_pretrained
    if not path:
        return load_tokenizer("shapesworld", model_max_length=n)
    if family(tower_class_for("text", path, hub_offline())) == "clip":
        return clip_tokenizer(n)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.tokenizer: empty, and model.text_pretrained {path!r} is not a local folder "
                                f"to read the tower's tokenizer from; pass --data.tokenizer FOLDER")
    return load_tokenizer(path, model_max_length=n)


def resolve_tokenizer(model, tokenizer=None):
    """The tokenizer to encode captions for `model` with: `tokenizer` when given (a name or
    folder for `solar.data.tokenizer.load_tokenizer`, or a tokenizer object), else the one the
    model carries (saved in its folder's ``tokenizer/``), else for folders written before
    tokenizers were saved: CLIP's BPE for a CLIP text tower, ShapesWorld's for a from-scratch one."""
    n = model.cfg.max_text_len
    if tokenizer is not None:
        return load_tokenizer(tokenizer, model_max_length=n) if isinstance(tokenizer, str) else tokenizer
    if getattr(model, "tokenizer", None) is not None:
        return model.tokenizer
    if model.cfg.text_pretrained or model.cfg.text_tower_class not in ("", "CLIPTextModel"):
        if family(model.text) == "clip":
            return clip_tokenizer(n)
        raise ValueError("tokenizer: the model folder carries no tokenizer and its text tower is a "
                         f"{type(model.text).__name__}; pass the tower's tokenizer folder")
    return load_tokenizer("shapesworld", model_max_length=n)
