"""SolarModel: shapes, masks, freezing, checkpoints (safetensors, no pickle), real-weights path."""
from __future__ import annotations

import json
import os

import pytest
import torch

from solar.checkpoint import CheckpointError
from solar.model import ModelConfig, SolarModel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tiny_cfg(**kw) -> ModelConfig:
    base = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                vocab_size=40, max_text_len=16, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64,
                bos_token_id=38, eos_token_id=39, pad_token_id=39, width=32, adapter_hidden=48,
                fusion_layers=2, fusion_heads=2, fusion_mlp=64, embed_dim=24)
    base.update(kw)
    return ModelConfig(**base)


def _batch(B=3, T=9, seed=0, cfg=None):
    cfg = cfg or _tiny_cfg()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 38, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.bool)
    lens = [T, T - 3, 4][:B] + [T] * max(0, B - 3)
    for i, n in enumerate(lens):
        ids[i, 0] = cfg.bos_token_id
        ids[i, n - 1] = cfg.eos_token_id
        ids[i, n:] = cfg.pad_token_id
        am[i, n:] = False
    pv = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    return {"pixel_values": pv, "input_ids": ids, "attention_mask": am}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SolarModel(_tiny_cfg()).eval()


def test_shapes_and_normalisation(model):
    b = _batch()
    v = model.patch_tokens(b["pixel_values"])
    t = model.text_tokens(b["input_ids"], b["attention_mask"])
    assert v.shape == (3, 16, 32) and t.shape == (3, 9, 32)
    gi = model.global_image(b["pixel_values"])
    gt = model.global_text(b["input_ids"], b["attention_mask"])
    assert torch.allclose(gi.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(gt.norm(dim=-1), torch.ones(3), atol=1e-5)
    s_v, s_l = model.local_similarities(b)
    assert s_v.shape == (3, 16) and s_l.shape == (3, 9)
    valid = model.text_valid_mask(b["input_ids"], b["attention_mask"])
    # BOS / EOS / padding are not content; s_L is zero there
    assert not valid[:, 0].any() and valid[2].sum() == 2
    assert (s_l[~valid] == 0).all()
    # s_V is the cosine between each patch token and the text global
    ref = torch.nn.functional.normalize(v, dim=-1) @ gt[0]
    assert torch.allclose(s_v[0], ref[0], atol=1e-5)
    f = model.embed(b)
    assert f.shape == (3, 24) and torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_fuse_masks_equal_dropping_positions(model):
    """A key masked out of E_VL behaves exactly as if the position were not there."""
    b = _batch()
    v = model.patch_tokens(b["pixel_values"])
    t = model.text_tokens(b["input_ids"], b["attention_mask"])
    pk = torch.zeros(3, 16, dtype=torch.bool)
    pk[:, [1, 5, 6]] = True
    tk = torch.zeros(3, 9, dtype=torch.bool)
    tk[:, [2, 3]] = True
    f = model.fuse(v, t, pk, tk)
    f_ref = model.fuse(v[:, [1, 5, 6]], t[:, [2, 3]])
    assert torch.allclose(f, f_ref, atol=1e-5)
    # one side fully dropped == that side absent; soft weights of 1 == keep
    f_img = model.fuse(v, t, None, torch.zeros(3, 9, dtype=torch.bool))
    assert torch.allclose(f_img, model.fuse(v, t[:, :0]), atol=1e-5)
    assert torch.allclose(model.fuse(v, t, torch.ones(3, 16), tk.float()), model.fuse(v, t, None, tk), atol=1e-5)
    with pytest.raises(ValueError, match="patch_keep"):
        model.fuse(v, t, torch.ones(3, 15, dtype=torch.bool), tk)
    with pytest.raises(ValueError, match="text_keep"):
        model.fuse(v, t, pk, torch.full((3, 9), 2.0))


def test_bidirectional_text_tower_masks_padding(model):
    """The default (text_causal=False) text tower attends over content keys only: the ids at
    padding positions and extra padding leave the features of content positions unchanged."""
    assert not model.cfg.text_causal and model.cfg.text_layers >= 1
    b = _batch()
    ids, am = b["input_ids"], b["attention_mask"]
    assert (~am).any()
    with torch.no_grad():
        t1 = model.text_tokens(ids, am)
        other = ids.clone()
        other[~am] = 7
        t2 = model.text_tokens(other, am)
        longer = torch.cat([ids, torch.full((3, 5), model.cfg.pad_token_id)], 1)
        longer_am = torch.cat([am, torch.zeros(3, 5, dtype=torch.bool)], 1)
        t3 = model.text_tokens(longer, longer_am)
        changed = ids.clone()
        changed[0, 3] = (ids[0, 3] + 1) % 38
        t4 = model.text_tokens(changed, am)
    assert torch.allclose(t2[am], t1[am], atol=1e-5)
    assert torch.allclose(t3[:, :9][am], t1[am], atol=1e-5)
    # not vacuous: a content token does reach the others (the tower has attention)
    assert not torch.allclose(t4[0, 1], t1[0, 1], atol=1e-4)


def test_embed_keys_are_the_content_tokens(model):
    """embed(batch) is E_VL over every patch and the content tokens: BOS / EOS / padding are no keys."""
    b = _batch()
    ids, am = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        v, t = model.patch_tokens(b["pixel_values"]), model.text_tokens(ids, am)
        valid = model.text_valid_mask(ids, am)
        f = model.embed(b)
        assert torch.allclose(f, model.fuse(v, t, None, valid), atol=1e-6)
        assert not torch.allclose(f, model.fuse(v, t, None, am), atol=1e-4)  # BOS / EOS keys would move it
    # a per-position text tower: new BOS / EOS embeddings change only those positions' features,
    # which embed never looks at
    import copy
    torch.manual_seed(1)
    m = SolarModel(_tiny_cfg(text_layers=0)).eval()
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        emb = getattr(m2.text, "text_model", m2.text).embeddings.token_embedding.weight
        emb[[m.cfg.bos_token_id, m.cfg.eos_token_id]] = 3 * torch.randn(2, emb.shape[1])
        assert not torch.allclose(m2.text_tokens(ids, am)[:, 0], m.text_tokens(ids, am)[:, 0], atol=1e-3)
        assert torch.allclose(m2.embed(b), m.embed(b), atol=1e-6)


def test_intersection_masks_use_thresholds(model):
    b = _batch()
    s_v, s_l = model.local_similarities(b)
    valid = model.text_valid_mask(b["input_ids"], b["attention_mask"])
    model.tau_v.fill_(float(s_v.median()))
    model.tau_l.fill_(-2.0)
    m_v, m_l = model.intersection_masks(b)
    assert m_v.dtype == torch.bool and m_v.shape == (3, 16)
    assert torch.equal(m_v, s_v > s_v.median())
    assert torch.equal(m_l, valid)  # every content token above tau_l = -2, specials never kept
    model.tau_v.zero_()
    model.tau_l.zero_()


def test_bad_inputs(model):
    b = _batch()
    with pytest.raises(ValueError, match="pixel_values"):
        model.patch_tokens(b["pixel_values"][:, :2])
    with pytest.raises(ValueError, match="spatial size"):
        model.patch_tokens(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="vocab_size"):
        model.text_tokens(torch.full((1, 4), 100), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        model.text_tokens(b["input_ids"], b["attention_mask"][:, :3])
    with pytest.raises(KeyError, match="pixel_values"):
        model.embed({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    with pytest.raises(ValueError, match="unknown preset .nope."):
        ModelConfig.preset_config("nope")
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"widht": 3})


def test_freeze_options():
    m = SolarModel(_tiny_cfg(freeze_vision=True))
    b = _batch()
    loss = m.embed(b).sum() + m.global_image(b["pixel_values"]).sum()
    loss.backward()
    assert all(p.grad is None for p in m.vision.parameters())
    assert any(p.grad is not None for p in m.text.parameters())
    assert any(p.grad is not None for p in m.adapter_v.parameters())
    m.train()
    assert not m.vision.training and m.text.training
    m.set_freeze(vision=False, text=True)
    assert all(p.requires_grad for p in m.vision.parameters())
    assert not any(p.requires_grad for p in m.text.parameters())


def test_save_load_round_trip(tmp_path, model, monkeypatch):
    b = _batch()
    model.tau_v.fill_(0.123)
    model.tau_l.fill_(-0.25)
    model.qda_v.copy_(torch.tensor([0.3, 0.01, 0.1, 0.02]))
    d = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    with open(d / "model.safetensors", "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    assert "tau_v" in header and "fusion.0.qkv.weight" in header

    def no_pickle(*a, **k):
        raise AssertionError("a SOLAR checkpoint must not be unpickled")
    monkeypatch.setattr(torch, "load", no_pickle)
    import pickle
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    m2 = SolarModel.from_pretrained(d).eval()
    assert float(m2.tau_v) == pytest.approx(0.123) and float(m2.tau_l) == pytest.approx(-0.25)
    assert torch.equal(m2.qda_v, model.qda_v)
    assert m2.cfg.to_dict() == model.cfg.to_dict()
    with torch.no_grad():
        assert torch.equal(model.embed(b), m2.embed(b))
        assert all(torch.equal(x, y) for x, y in zip(model.intersection_masks(b), m2.intersection_masks(b)))
    model.tau_v.zero_()
    model.tau_l.zero_()
    model.qda_v.zero_()


def test_load_errors(tmp_path, model):
    with pytest.raises(CheckpointError, match="not a directory"):
        SolarModel.from_pretrained(tmp_path / "missing")
    d = model.save_pretrained(tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        SolarModel.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        SolarModel.from_pretrained(d)


def test_real_weights_path_offline(tmp_path, monkeypatch):
    """Save a tiny CLIP checkpoint + tokenizer, reload them offline through ModelConfig."""
    from transformers import CLIPConfig, CLIPModel

    from solar.data.tokenizer import load_tokenizer, save_tokenizer, shapesworld_tokenizer

    tok = shapesworld_tokenizer(32)
    clip_dir = tmp_path / "tiny-clip"
    clip_cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(1)
    clip = CLIPModel(clip_cfg)
    clip.save_pretrained(clip_dir)
    save_tokenizer(tok, str(clip_dir))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok2 = load_tokenizer(str(clip_dir))
    cfg = ModelConfig(vision_pretrained=str(clip_dir), text_pretrained=str(clip_dir), text_causal=True,
                      width=32, adapter_hidden=32, fusion_heads=2, fusion_mlp=32, embed_dim=16).with_tokenizer(tok2)
    m = SolarModel(cfg).eval()
    assert m.cfg.image_size == 32 and m.cfg.vocab_size == len(tok)
    ref = clip.state_dict()
    # the towers load as CLIP*ModelWithProjection: the CLIP folder's names, projection heads included
    for tower, prefix in ((m.vision, "vision_model."), (m.text, "text_model.")):
        for name, p in tower.state_dict().items():
            assert torch.equal(p, ref[name if name in ref else prefix + name]), name
    enc = tok2(["a red circle at top left", "made of wood"], padding=True, return_tensors="pt")
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": enc["input_ids"],
             "attention_mask": enc["attention_mask"].bool()}
    # the causal tower gives the same token states as transformers' own forward
    with torch.no_grad():
        h = clip.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        assert torch.allclose(m.adapter_l(h), m.text_tokens(batch["input_ids"], batch["attention_mask"]), atol=1e-5)
        f = m.embed(batch)
    # a SOLAR checkpoint rebuilds the towers from its own config: the CLIP folder can go
    solar_dir = m.save_pretrained(tmp_path / "solar")
    import shutil
    shutil.rmtree(clip_dir)
    m2 = SolarModel.from_pretrained(solar_dir).eval()
    with torch.no_grad():
        assert torch.allclose(m2.embed(batch), f, atol=1e-6)
    # a missing local path with the hub offline fails loudly
    with pytest.raises(OSError):
        SolarModel(ModelConfig(vision_pretrained=str(clip_dir)))


def test_local_context_is_local_residual_and_ignores_padding():
    from solar.model import LocalContext
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 6, generator=g)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 8:] = False
    ctx = LocalContext(6, 5)
    # zero-initialised: starts as the identity (the per-position towers)
    assert torch.equal(ctx(x, valid), x)
    with torch.no_grad():
        ctx.conv.weight.normal_(generator=g)
        ctx.conv.bias.zero_()
    y = ctx(x, valid)
    # direct formula: y_i = x_i + sum_{|d| <= 2} W[:, :, d + 2] x_{i+d} over valid neighbours
    xv = x * valid[..., None]
    ref = x.clone()
    for i in range(11):
        for d in range(-2, 3):
            if 0 <= i + d < 11:
                ref[:, i] += xv[:, i + d] @ ctx.conv.weight[:, :, d + 2].T
    assert torch.allclose(y, ref, atol=1e-5)
    # a change 3 positions away does not reach position 0; padded values never matter
    x2 = x.clone()
    x2[:, 3:] += 5.0
    x2[1, 8:] = 123.0
    y2 = ctx(x2, valid)
    assert torch.allclose(y2[:, 0], y[:, 0], atol=1e-5)
    x3 = x.clone()
    x3[1, 8:] = -7.0
    assert torch.allclose(ctx(x3, valid)[1, :8], y[1, :8], atol=1e-6)
    # the grid form mixes 3 x 3 neighbourhoods of a 4 x 4 patch grid only
    grid = LocalContext(6, 3, grid=True)
    with torch.no_grad():
        grid.conv.weight.normal_(generator=g)
    p = torch.randn(1, 16, 6, generator=g)
    p2 = p.clone()
    p2[0, 15] += 3.0  # patch (3, 3): outside the 3 x 3 neighbourhood of patch (0, 0)
    assert torch.allclose(grid(p)[0, 0], grid(p2)[0, 0], atol=1e-6)
    assert not torch.allclose(grid(p)[0, 10], grid(p2)[0, 10])  # patch (2, 2) is a neighbour
    with pytest.raises(ValueError, match="odd"):
        LocalContext(6, 4)
    with pytest.raises(ValueError, match="square"):
        grid(torch.randn(1, 15, 6))


def test_tiny_preset_has_text_context_and_checkpoints_keep_it(tmp_path):
    cfg = ModelConfig.preset_config("tiny")
    assert cfg.text_context_window > 0 and ModelConfig.preset_config("clip-b16").text_context_window == 0
    torch.manual_seed(0)
    m = SolarModel(_tiny_cfg(text_layers=0, vision_layers=0, text_context_window=3, vision_context_window=3)).eval()
    with torch.no_grad():
        m.context_l.conv.weight.normal_()
    b = _batch(cfg=m.cfg)
    m.save_pretrained(tmp_path / "m")
    m2 = SolarModel.from_pretrained(tmp_path / "m").eval()
    assert m2.context_l is not None and m2.context_v is not None
    with torch.no_grad():
        assert torch.allclose(m.text_tokens(b["input_ids"], b["attention_mask"]),
                              m2.text_tokens(b["input_ids"], b["attention_mask"]), atol=1e-6)
        # padding content does not change a row's tokens
        ids = b["input_ids"].clone()
        ids[1, ~b["attention_mask"][1]] = 5
        t1 = m.text_tokens(b["input_ids"], b["attention_mask"])
        t2 = m.text_tokens(ids, b["attention_mask"])
        am = b["attention_mask"][1]
        assert torch.allclose(t1[1, am], t2[1, am], atol=1e-6)


def test_text_segments_and_phrase_level_similarities():
    torch.manual_seed(0)
    # ids 7 and 8 delimit phrases ("and", ","); 38 / 39 are BOS / EOS (= padding)
    m = SolarModel(_tiny_cfg(text_segment_ids=[7, 8])).eval()
    ids = torch.tensor([[38, 3, 4, 7, 5, 6, 9, 8, 10, 39, 39],
                        [38, 3, 39, 39, 39, 39, 39, 39, 39, 39, 39]])
    am = torch.tensor([[1] * 10 + [0], [1] * 3 + [0] * 8]).bool()
    seg = m.text_segments(ids, am)
    assert seg.tolist() == [[-1, 0, 0, -1, 1, 1, 1, -1, 2, -1, -1], [-1, 0] + [-1] * 9]
    assert SolarModel(_tiny_cfg()).text_segments(ids, am) is None
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 11, 32, generator=g)
    n = m.local_text_features(t, seg)
    u = torch.nn.functional.normalize(t, dim=-1)
    assert torch.allclose(n[0, 1], (u[0, 1] + u[0, 2]) / 2, atol=1e-6)
    assert torch.allclose(n[0, 5], (u[0, 4] + u[0, 5] + u[0, 6]) / 3, atol=1e-6)
    assert torch.allclose(n[0, 3], u[0, 3]) and torch.allclose(n[0, 8], u[0, 8], atol=1e-6)
    assert torch.equal(m.local_text_features(t, None), u)
    # s_L is constant over a phrase, so each phrase is kept or dropped as a whole
    b = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": am}
    s_v, s_l = m.local_similarities(b)
    assert torch.allclose(s_l[0, 4], s_l[0, 5]) and torch.allclose(s_l[0, 5], s_l[0, 6])
    m.tau_l.fill_(float(s_l[0, 4]) - 1e-4)
    _, m_l = m.intersection_masks(b)
    assert m_l[0, 4:7].all()
    # the tokenizer resolves the words of text_segment_words (single-token words only)
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 38, 39, 39
        def __len__(self):
            return 40
        def encode(self, w, add_special_tokens=False):
            return {"and": [7], ",": [8], "as well": [11, 12]}[w]
    cfg = _tiny_cfg(text_segment_words=["and", ",", "as well"]).with_tokenizer(Tok())
    assert cfg.text_segment_ids == [7, 8]


def test_encode_retriever_and_load_input_errors():
    """solar.encode / Retriever / load: bad arguments raise naming the argument; the output is
    [N, cfg.embed_dim]; add_embeddings takes lists and arrays; the Index stays on CPU."""
    import numpy as np

    import solar
    from solar.data.tokenizer import load_tokenizer
    tok = load_tokenizer("shapesworld", model_max_length=16)
    torch.manual_seed(0)
    m = SolarModel(_tiny_cfg(text_context_window=3).with_tokenizer(tok)).eval()
    imgs = [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 200, np.uint8), np.full((32, 32, 3), 90, np.uint8)]
    caps = ["a red circle", "a blue square at top left", "a green triangle"]
    emb = solar.encode(imgs, caps, model=m, batch_size=2)
    assert emb.shape == (3, m.cfg.embed_dim) and emb.dtype == torch.float32
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        solar.encode(imgs, caps, model=m, batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        solar.encode(imgs, caps, model=m, batch_size=2.0)
    with pytest.raises(TypeError, match="texts: .*single str"):
        solar.encode(imgs[:1], "a red circle", model=m)
    with pytest.raises(TypeError, match="images: .*single str"):
        solar.encode("a.png", caps[:1], model=m)
    for call in (lambda: solar.encode(imgs, caps, model=m, device="gpu"), lambda: solar.load(m, device="gpu"),
                 lambda: solar.Retriever(m, device="gpu")):
        with pytest.raises(ValueError, match="device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
            call()
    with pytest.raises(ValueError, match="kind"):
        solar.load((m, "bogus"))
    assert solar.load((m, "clip_sf"))[1] == "clip_sf"
    with pytest.raises(ValueError, match="dtype"):
        solar.Retriever(m, dtype="float32")
    r = solar.Retriever(m, batch_size=2)
    assert r.index.device.type == "cpu"
    r.add_embeddings(emb[:1].tolist()).add_embeddings(emb[1:].numpy(), ids=["b", "c"])
    assert len(r) == 3 and r.search(imgs[2:], caps[2:], k=1)[1] == [["c"]]
    with pytest.raises(ValueError, match=rf"emb: expected shape \[n, {m.cfg.embed_dim}\], got \(1, 2\)"):
        r.add_embeddings([[1.0, 2.0]])
    with pytest.raises(TypeError, match="emb"):
        r.add_embeddings("abc")
