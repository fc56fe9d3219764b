"""Pretrained towers: CLIP's tokenizer, tokenizer / tower matching, tower families, LoRA, zero-shot CLIP-SF.

Tiny towers are built from configs (never downloaded) with the real architectures.
"""
import importlib.util
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from solar import towers
from solar.config import ModelConfig, get_preset
from solar.data import shapesworld as sw
from solar.data.tokenizer import (CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, clip_tokenizer, load_tokenizer,
                                  shapesworld_tokenizer)
from solar.model import SolarModel
from solar.rehearsal import write_clip_towers, write_dinov2_xlmr_towers

if importlib.util.find_spec("open_clip") is None:   # located, never imported (its __init__ imports torchvision)
    pytest.skip("open_clip_torch ships CLIP's BPE file (pip install --no-deps open_clip_torch)", allow_module_level=True)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_towers(str(tmp_path_factory.mktemp("clip") / "clip"), width=32, layers=1)


@pytest.fixture(scope="module")
def dx_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dx")
    return write_dinov2_xlmr_towers(str(root / "dinov2"), str(root / "xlmr"), width=32, layers=1)


def _small(**kw):
    base = dict(width=32, adapter_hidden=32, fusion_layers=1, fusion_heads=2, fusion_mlp=32, embed_dim=16)
    base.update(kw)
    return ModelConfig(**base)


def _open_clip_tokenizer():
    """open_clip's own tokenizer module, loaded from its file (never `import open_clip`: its
    package __init__ imports torchvision)."""
    root = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    name = "_solar_test_open_clip_tokenizer"
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "tokenizer.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:   # a relative import of the package: not loadable on its own
        pytest.skip(f"open_clip's tokenizer.py does not load by path here ({e})")
    return mod.SimpleTokenizer(), mod


def _captions(n=300, seed=0):
    rng = random.Random(seed)
    extra = ["Hello, World!", "it's a dog's life", "we're here & they'll come", "  spaces   and\ttabs\n ",
             "café crème brûlée", "Ã©tÃ© mojibake", "&amp;lt;html&amp;gt; &quot;quoted&quot;", "naïve façade",
             "emoji 🐶🐱 party 🎉", "中文 字幕 测试", "Ünïcödé ÀÉÎÕÜ", "numbers 12345 and 3.14159", "e-mail: a@b.c",
             "UPPER lower MiXeD", "the <|endoftext|> token in text", "don't stop-believing!!!", "x" * 300,
             " ".join(["word"] * 120), "1/2 cup, 3° angle — dash – en", "«quotes» „low“ ‘single’"]
    words = list(sw.VOCABULARY) + ["photo", "of", "the", "a", "Cat", "DOG", "running", "on", "beach", "sunset,",
                                   "New", "York", "2024", "4K", "HD", "wallpaper", "(vintage)", "-", "&", "#tag"]
    caps = list(extra)
    for i in range(n - len(extra)):
        if i % 3 == 0:
            caps.append(sw.make_pair(1, i, 0)[2])
        else:
            caps.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))))
    return caps


# --------------------------------------------------------------------------- CLIP tokenizer

def test_clip_tokenizer_equals_open_clip_on_varied_captions():
    ref, mod = _open_clip_tokenizer()
    tok = clip_tokenizer()
    assert (len(tok), tok.bos_token_id, tok.eos_token_id) == (CLIP_VOCAB_SIZE, CLIP_BOS_ID, CLIP_EOS_ID)
    caps = _captions()
    assert len(caps) >= 300
    ours = tok(caps, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    theirs = mod.tokenize(caps, context_length=77) if hasattr(mod, "tokenize") else ref(caps, context_length=77)
    am = ours["attention_mask"].bool()
    bad = [i for i in range(len(caps))
           if not torch.equal(ours["input_ids"][i][am[i]], theirs[i][:int(am[i].sum())])
           or bool(theirs[i][int(am[i].sum()):].any())]
    assert not bad, f"{len(bad)} of {len(caps)} captions differ, first {caps[bad[0]]!r}: " \
                    f"{ours['input_ids'][bad[0]][am[bad[0]]].tolist()} vs {theirs[bad[0]].tolist()}"
    # truncation keeps CLIP's EOS at the end of a full context
    assert ours["input_ids"][caps.index("x" * 300)][-1] == CLIP_EOS_ID


def test_clip_tokenizer_saved_and_reloaded_keeps_the_cleaning(tmp_path):
    tok = clip_tokenizer()
    tok.save_pretrained(str(tmp_path / "t"))
    again = load_tokenizer(str(tmp_path / "t"))
    text = "Caf&amp;eacute; &amp; Ã©tÃ©"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again(text)["input_ids"] == tok("café & été")["input_ids"]


# --------------------------------------------------------------------------- tokenizer / tower match

def _clip_b16(clip_dir, **data):
    cfg = get_preset("clip-b16")
    cfg.model.vision_pretrained = cfg.model.text_pretrained = clip_dir
    cfg.model.width, cfg.model.adapter_hidden, cfg.model.fusion_mlp, cfg.model.embed_dim = 32, 32, 32, 16
    cfg.model.fusion_heads, cfg.model.fusion_layers, cfg.model.lora_rank = 2, 1, 0
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_clip_b16_refuses_the_shapesworld_tokenizer(clip_dir):
    """The clip-b16 preset used to feed ShapesWorld's BPE (ids under CLIP's vocabulary size, other
    BOS / EOS ids) to CLIP's text tower without a word."""
    from solar.train import build_model
    cfg = _clip_b16(clip_dir)
    with pytest.raises(towers.TokenizerMismatch, match="bos id .* != the tower's 49406"):
        build_model(cfg, shapesworld_tokenizer(77), 0)
    # the default for a CLIP text tower is CLIP's BPE; the model carries it
    tok = towers.default_tokenizer(cfg.model, cfg.data.tokenizer)
    m = build_model(cfg, tok, 0)
    assert m.tokenizer is tok and (m.cfg.bos_token_id, m.cfg.eos_token_id) == (CLIP_BOS_ID, CLIP_EOS_ID)
    b = tok(["a red circle"], return_tensors="pt")
    assert m.text_valid_mask(b["input_ids"], b["attention_mask"].bool()).sum() == 3


def test_train_cli_refuses_a_mismatched_tokenizer_before_any_data(clip_dir, tmp_path, capsys):
    from solar.train import main
    rc = main(["--preset", "clip-b16", "--model.vision_pretrained", clip_dir, "--model.text_pretrained", clip_dir,
               "--data.tokenizer", "shapesworld", "--data.synthetic_ok", "true", "--out", str(tmp_path / "r"),
               "--data.cache_dir", str(tmp_path / "cache"), "--run.device", "cpu"])
    assert rc == 2 and "does not match the pretrained CLIPTextModelWithProjection" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "cache")


def test_pretrained_towers_need_real_data_or_say_synthetic(clip_dir):
    from solar.cli import parse_args
    base = ["--preset", "clip-b16", "--model.vision_pretrained", clip_dir, "--model.text_pretrained", clip_dir]
    with pytest.raises(SystemExit):
        parse_args(base)
    with pytest.raises(SystemExit):
        parse_args(base + ["--data.train_shards", "x.tar"])
    assert parse_args(base + ["--data.train_shards", "x.tar", "--data.bench_dir", "b"]).data.bench_dir == "b"
    assert parse_args(base + ["--data.synthetic_ok", "true"]).data.synthetic_ok


def test_xlmr_tower_checks_pad_and_special_ids(dx_dirs):
    vis, txt = dx_dirs
    cfg = _small(vision_pretrained=vis, text_pretrained=txt, image_size=56, max_text_len=32)
    tok = towers.default_tokenizer(cfg)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    name, tc = towers.pretrained_text_config(cfg)
    towers.check_tokenizer(tok, config=tc, class_name=name)
    with pytest.raises(towers.TokenizerMismatch, match="pad id"):
        towers.check_tokenizer(shapesworld_tokenizer(32), config=tc, class_name=name)


# --------------------------------------------------------------------------- tower families

def test_dinov2_xlmr_towers_conventions(dx_dirs, tmp_path):
    vis, txt = dx_dirs
    tok = load_tokenizer(txt, model_max_length=32)
    cfg = _small(vision_pretrained=vis, text_pretrained=txt, image_size=56, max_text_len=32).with_tokenizer(tok)
    m = SolarModel(cfg).eval()
    m.tokenizer = tok
    assert (m.cfg.patch_size, m.cfg.image_size, m.cfg.num_patches) == (14, 56, 16)
    assert m.cfg.vision_tower_class == "Dinov2Model" and m.cfg.text_tower_class == "XLMRobertaModel"
    b = tok(["a red circle", "a big blue star at top left"], padding=True, return_tensors="pt")
    ids, am = b["input_ids"], b["attention_mask"].bool()
    valid = m.text_valid_mask(ids, am)
    assert valid.sum(1).tolist() == [3, 7]   # <s>, </s> and <pad> excluded
    pv = torch.randn(2, 3, 56, 56)
    assert m.patch_tokens(pv).shape == (2, 16, 32)
    batch = {"pixel_values": pv, "input_ids": ids, "attention_mask": am}
    f = m.embed(batch)
    m2 = SolarModel.from_pretrained(m.save_pretrained(tmp_path / "m")).eval()
    assert torch.allclose(m2.embed(batch), f, atol=1e-6) and m2.tokenizer is not None
    assert m2.tokenizer("a red circle")["input_ids"] == tok("a red circle")["input_ids"]
    with pytest.raises(ValueError, match="zero-shot|projection"):
        from solar.baselines import zero_shot_embed
        zero_shot_embed(m, batch)


def test_siglip_towers_conventions():
    from transformers import SiglipTextConfig, SiglipTextModel, SiglipVisionConfig, SiglipVisionModel
    v = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8))
    t = SiglipTextModel(SiglipTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16))
    assert towers.patch_states(v, torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)   # no [CLS]
    ids = torch.randint(0, 100, (2, 9))
    assert towers.text_states(t, ids, torch.ones(2, 9, dtype=torch.bool), causal=False).shape == (2, 9, 32)
    assert towers.zero_shot_image(v, torch.randn(2, 3, 32, 32)).shape == (2, 32)


# --------------------------------------------------------------------------- LoRA

def test_lora_trains_adapters_only_and_saves_merged(clip_dir, tmp_path):
    pytest.importorskip("peft")
    tok = clip_tokenizer()
    cfg = _small(vision_pretrained=clip_dir, text_pretrained=clip_dir, text_causal=True, lora_rank=4,
                 lora_alpha=8.0).with_tokenizer(tok)
    torch.manual_seed(0)
    m = SolarModel(cfg)
    m.tokenizer = tok
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    tower = [n for n in trainable if n.startswith(("vision.", "text."))]
    assert tower and all("lora_" in n for n in tower)
    assert not any("projection" in n for n in trainable)
    # one step that moves the LoRA weights (B starts at 0: give it a non-zero value)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    b = tok(["a red circle", "two blue stars"], padding=True, return_tensors="pt")
    batch = {"pixel_values": torch.randn(2, 3, 224, 224), "input_ids": b["input_ids"],
             "attention_mask": b["attention_mask"].bool()}
    m.eval()
    f = m.embed(batch)
    d = m.save_pretrained(tmp_path / "merged")
    import json
    meta = json.load(open(d / "config.json"))["solar_model_config"]
    assert meta["lora_rank"] == 0
    from safetensors.torch import load_file
    assert not any("lora_" in k or "base_layer" in k for k in load_file(str(d / "model.safetensors")))
    m2 = SolarModel.from_pretrained(d).eval()
    assert not towers.has_lora(m2.vision) and torch.allclose(m2.embed(batch), f, atol=1e-5)
    # a training checkpoint keeps the adapters apart
    d3 = m.save_pretrained(tmp_path / "ckpt", merge_lora=False)
    m3 = SolarModel.from_pretrained(d3).eval()
    assert towers.has_lora(m3.text) and torch.allclose(m3.embed(batch), f, atol=1e-6)


def test_resume_after_stage1_gives_stage2_its_lora_back(clip_dir, tmp_path):
    """`--resume` with stage 1 finished loads the saved stage-1 model (LoRA folded in); stage 2
    must get LoRA again, as with `--run.stage 2`, or a stage-2 checkpoint written with LoRA
    cannot be loaded (and stage 2 would silently fine-tune the whole towers)."""
    pytest.importorskip("peft")
    import solar.train as T
    from solar.distributed import DistInfo
    tok = clip_tokenizer()
    cfg = _clip_b16(clip_dir)
    cfg.model.lora_rank, cfg.model.lora_alpha = 4, 8.0
    cfg.run.out_dir, cfg.run.resume = str(tmp_path), True
    trained = T.build_model(cfg, tok, 0)          # what stage 1 trains (LoRA in the towers)
    final = T.model_dir(cfg.run.out_dir, "stage1")
    trained.save_pretrained(final)                # folded in
    T._write_kind(final, "solar", cfg.stage1.steps)
    back = T.run_phase_stage1(cfg, None, tok, DistInfo(), None)
    assert towers.has_lora(back.vision) and towers.has_lora(back.text)
    assert set(back.state_dict()) == set(trained.state_dict())     # a stage-2 checkpoint's keys


# --------------------------------------------------------------------------- zero-shot CLIP-SF

def test_zero_shot_clip_sf_uses_clips_projection_heads(clip_dir):
    from transformers import CLIPModel

    from solar.baselines import embedding_dim, zero_shot_embed
    tok = clip_tokenizer()
    m = SolarModel(_small(vision_pretrained=clip_dir, text_pretrained=clip_dir, text_causal=True)
                   .with_tokenizer(tok)).eval()
    assert m.cfg.tower_projections and embedding_dim(m, "clip_zs") == 32
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    b = tok(["a red circle", "a small green square at top left"], padding=True, return_tensors="pt")
    pv = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got = zero_shot_embed(m, {"pixel_values": pv, "input_ids": b["input_ids"],
                                  "attention_mask": b["attention_mask"].bool()})
        # CLIP's definition: the pooled ([CLS] / EOS) states through the projection heads
        fi = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pv).pooler_output), dim=-1)
        ft = F.normalize(clip.text_projection(clip.text_model(input_ids=b["input_ids"],
                                                              attention_mask=b["attention_mask"]).pooler_output), dim=-1)
    want = F.normalize(fi + ft, dim=-1)
    assert torch.allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- the tokenizer travels with the model

def test_encode_and_retriever_use_the_models_own_tokenizer(tmp_path):
    """`solar.encode` / `Retriever` used "shapesworld" whatever the model was trained with (the
    ids of another tokenizer fit under a large vocabulary, so nothing failed: wrong embeddings)."""
    import numpy as np

    import solar
    tok = clip_tokenizer(32)
    cfg = _small(image_size=32, patch_size=16, max_text_len=32).with_tokenizer(tok)
    torch.manual_seed(0)
    m = SolarModel(cfg)
    m.tokenizer = tok
    d = str(m.save_pretrained(tmp_path / "m"))
    (tmp_path / "m" / "solar_embedding.json").write_text('{"embedding": "solar", "steps": 0}')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["a red circle", "two blue stars on a table", "xylophone"]
    got = solar.encode(images, texts, model=d)
    assert torch.allclose(got, solar.encode(images, texts, model=d, tokenizer=tok), atol=1e-6)
    assert not torch.allclose(got, solar.encode(images, texts, model=d, tokenizer="shapesworld"), atol=1e-3)
    r = solar.Retriever(d)
    r.add(images, texts)
    assert torch.allclose(r.encode(images, texts), got, atol=1e-6)


# the pretrained-tower presets as they were written out in full, before dinov2-bge was derived
# from clip-b16 (the section overrides each preset sets)
_WRITTEN_OUT = {
    "clip-b16": {
        "model": dict(image_size=224, patch_size=16, max_text_len=77,
                      vision_pretrained="openai/clip-vit-base-patch16", text_pretrained="openai/clip-vit-base-patch16",
                      text_causal=True, width=768, adapter_hidden=1536, fusion_layers=3, fusion_heads=12,
                      fusion_mlp=3072, embed_dim=768, lora_rank=16, lora_alpha=32.0),
        "stage1": dict(steps=5000, lr=1e-4, tower_lr_scale=1.0, warmup_steps=200, temperature=0.05,
                       teacher="init", gd_weight=1.0, ld_weight=1.0, log_every=50, eval_every=500, ckpt_every=1000),
        "stage2": dict(steps=5000, batch_size=1024, lr=5e-5, warmup_steps=200, refresh_every=1000,
                       mine_pool_size=1_000_000, mine_k=8, n_segments=8, kmeans_iters=10, img_neutral_ratio=0.0,
                       mine_dtype="fp16"),
        "data": dict(train_pairs=1_000_000, batch_size=1024, shard_size=10000, bench_pool=100_000, num_workers=8,
                     in_memory=False),
        "eval": dict(batch_size=512),
        "run": dict(out_dir="runs/solar-clip-b16", ckpt_every=1000, log_every=50, precision="bf16"),
    },
    "dinov2-bge": {
        "model": dict(image_size=224, patch_size=14, max_text_len=128,
                      vision_pretrained="facebook/dinov2-base", text_pretrained="BAAI/bge-m3",
                      text_causal=False, width=768, adapter_hidden=1536, fusion_layers=3, fusion_heads=12,
                      fusion_mlp=3072, embed_dim=768, lora_rank=16, lora_alpha=32.0),
        "stage1": dict(steps=5000, lr=1e-4, tower_lr_scale=1.0, warmup_steps=200, temperature=0.05,
                       teacher="init", gd_weight=1.0, ld_weight=1.0, log_every=50, eval_every=500, ckpt_every=1000),
        "stage2": dict(steps=5000, batch_size=1024, lr=5e-5, warmup_steps=200, refresh_every=1000,
                       mine_pool_size=1_000_000, mine_k=8, n_segments=8, kmeans_iters=10, img_neutral_ratio=0.0,
                       mine_dtype="fp16"),
        "data": dict(train_pairs=1_000_000, batch_size=1024, shard_size=10000, bench_pool=100_000, num_workers=8,
                     in_memory=False),
        "eval": dict(batch_size=512),
        "baseline": dict(zero_shot=False),
        "run": dict(out_dir="runs/solar-dinov2-bge", ckpt_every=1000, log_every=50, precision="bf16"),
    },
}


@pytest.mark.parametrize("name", sorted(_WRITTEN_OUT))
def test_derived_presets_resolve_as_the_written_out_ones(name, monkeypatch):
    """dinov2-bge is clip-b16 plus overrides: each preset resolves to the same TrainConfig as its
    written-out form (compared resolved, so a changed default moves both alike)."""
    import solar.config as C
    got = C.config_to_dict(C.get_preset(name))
    monkeypatch.setitem(C.PRESETS, name, _WRITTEN_OUT[name])
    assert got == C.config_to_dict(C.get_preset(name))
    assert C.PRESETS["dinov2-bge"] is not C.PRESETS["clip-b16"]
