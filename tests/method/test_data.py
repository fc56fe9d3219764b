"""ShapesWorld generator, tokenizer and webdataset reader."""
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from solar.data import shapesworld as sw
from solar.data.reader import (ImageTransform, PairDataset, ReaderStats, collate_pairs, expand_urls, make_loader)
from solar.data.tokenizer import build_bpe, load_tokenizer, save_tokenizer, shapesworld_tokenizer

PAIRS, SHARD = 120, 30  # 4 shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sw"))
    man = sw.write_shards(out, PAIRS, seed=3, shard_size=SHARD, workers=1, progress=False)
    return out, man


@pytest.fixture(scope="module")
def tok():
    return shapesworld_tokenizer()


def _read_tar(path):
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


# ---------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------
def test_generator_deterministic_and_worker_independent(tmp_path, shards):
    out, man = shards
    assert man["shards"] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert man["item_id_range"] == [0, PAIRS]
    again = sw.write_shards(str(tmp_path), PAIRS, seed=3, shard_size=SHARD, workers=2, progress=False)
    for name in again["shards"]:
        with open(os.path.join(out, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), f"{name} differs between 1 and 2 worker processes"
    k1, p1, c1, m1 = sw.make_pair(3, 7, 0)
    k2, p2, c2, m2 = sw.make_pair(4, 7, 0)
    assert (p1, c1) != (p2, c2), "a different seed must give a different world"
    assert sw.make_pair(3, 7, 0)[1:] == (p1, c1, m1)


def test_views_have_intersection_and_differences():
    n_sizes = set()
    for item_id in range(300):
        key, png, cap, meta = sw.make_pair(11, item_id, item_id % 3)
        n = len(meta["objects"])
        n_sizes.add(n)
        shown, described, inter = set(meta["shown"]), set(meta["described"]), set(meta["intersection"])
        assert inter == shown & described and len(inter) >= 1
        assert len(shown - described) >= 1, "the image must show something the caption does not describe"
        assert meta["described_attrs"], "the caption must carry text-only attributes"
        assert cap == " ".join(meta["words"])
        assert set(meta["words"]) <= set(sw.VOCABULARY)
        assert len(meta["words"]) == len(meta["word_flags"]) == len(meta["word_object"])
        for w, f, o in zip(meta["words"], meta["word_flags"], meta["word_object"]):
            if f:
                assert o in inter and w not in sw.FUNCTION_WORDS
            elif o in inter:
                assert w in ("a", "at")
        # every content word of an intersection object is flagged, and only those
        flagged = sum(meta["word_flags"])
        assert flagged == 5 * len(inter)
        cells = {(o["row"], o["col"]) for o in meta["objects"]}
        assert len(cells) == n, "objects must sit in distinct cells"
        assert all(o["occupancy"] is not None for i, o in enumerate(meta["objects"]) if i in shown)
    assert n_sizes == {2, 3, 4, 5}


def test_ground_truth_matches_rendered_pixels(shards, tok):
    """The gt patch mask must equal the patches holding pixels of shown+described objects,
    found from the rendered image alone (object pixels = non-background, assigned by grid cell)."""
    out, man = shards
    samples = _read_tar(os.path.join(out, man["shards"][0]))
    cell = 64 // sw.GRID
    checked = 0
    for key, s in samples.items():
        meta = json.loads(s["json"])
        img = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")).astype(int)
        bg = img[0, 0]
        # the board's corners may hold an object: use the most common colour as background
        cols, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        bg = cols[counts.argmax()]
        fg = (img != bg).any(-1)
        by_cell = {(o["row"], o["col"]): (i, o) for i, o in enumerate(meta["objects"])}
        expected = np.zeros((8, 8), dtype=bool)
        for r in range(sw.GRID):
            for c in range(sw.GRID):
                block = fg[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
                i, o = by_cell.get((r, c), (None, None))
                if i is None or i not in meta["shown"]:
                    assert not block.any(), f"{key}: pixels drawn in cell {(r, c)} that shows no object"
                    continue
                assert block.sum() >= 6, f"{key}: shown object {i} has only {block.sum()} pixels"
                rgb = img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell][block]
                assert np.abs(rgb - np.array(sw.COLORS[o["color"]])).max() <= 12, f"{key}: wrong colour"
                occ = np.unpackbits(np.frombuffer(bytes.fromhex(o["occupancy"]), np.uint8))[:256].reshape(16, 16)
                full = np.zeros((64, 64), dtype=bool)
                full[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = block
                assert (full.reshape(16, 4, 16, 4).any((1, 3)) == occ).all(), f"{key}: occupancy != pixels"
                if i in meta["intersection"]:
                    expected |= full.reshape(8, 8, 8, 8).any((1, 3))
        batch = collate_pairs([Image.open(io.BytesIO(s["png"]))], [s["txt"].decode()], tok, 64, 8, metas=[meta])
        got = batch["gt_patch_mask"][0].view(8, 8).numpy()
        assert (got == expected).all(), f"{key}: gt patch mask differs from the rendered intersection objects"
        assert got.any()
        checked += 1
    assert checked == SHARD


def test_refuses_benchmark_item_ids(tmp_path):
    with pytest.raises(ValueError, match="benchmark-reserved"):
        sw.write_shards(str(tmp_path), 10, item_offset=sw.BENCHMARK_ITEM_BASE - 5, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        sw.write_shards(str(tmp_path), 10, image_size=50, progress=False)


def test_cli(tmp_path, capsys):
    sw.main(["--out", str(tmp_path), "--pairs", "25", "--seed", "1", "--shard-size", "10", "--no-progress",
             "--workers", "1", "--views-per-item", "2"])
    man = json.loads((tmp_path / "shapesworld.json").read_text())
    assert man["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert man["item_id_range"] == [0, 13]
    assert "pairs/s" in capsys.readouterr().out
    keys = sorted(k for n in man["shards"] for k in _read_tar(str(tmp_path / n)))
    assert keys[:3] == ["0000000000_000", "0000000000_001", "0000000001_000"] and len(keys) == 25


# ---------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------
def test_tokenizer_one_token_per_word_and_reload(tmp_path, tok):
    for w in sw.VOCABULARY:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    _, _, cap, meta = sw.make_pair(0, 1, 0)
    ids = tok(cap)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == len(meta["words"]) + 2
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in meta["words"]]
    # open-vocabulary text still tokenises (byte-level pieces), upper case is lowered
    assert tok("A RED Star")["input_ids"] == tok("a red star")["input_ids"]
    assert len(tok("xylophone quartz!", add_special_tokens=False)["input_ids"]) > 2
    save_tokenizer(tok, str(tmp_path / "tok"))
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again(cap)["input_ids"] == ids
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_tokenizer(str(tmp_path / "missing"))


def test_build_bpe_greedy_merges_keep_earlier_words():
    vocab, merges = build_bpe(["ab", "xab", "abc", "b"])
    assert len(vocab) == 512 + len({a + b for a, b in merges}) + 2
    from solar.data.tokenizer import _bpe
    ranks = {m: i for i, m in enumerate(merges)}
    for w in ["ab", "xab", "abc", "b"]:
        assert _bpe(w, ranks) == [w + "</w>"]
    with pytest.raises(ValueError, match="words"):
        build_bpe(["Bad"])


# ---------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------
def _all_keys(out, man):
    return sorted(k for n in man["shards"] for k in _read_tar(os.path.join(out, n)))


def test_reader_two_workers_batch_format(shards, tok, caplog):
    out, man = shards
    loader = make_loader(os.path.join(out, "shard-{000000..000003}.tar"), tok, num_workers=2, batch_size=16,
                         shuffle_buffer=20, seed=1)
    keys = []
    with caplog.at_level(logging.INFO, logger="solar.data"):
        for b in loader:
            B, T = b["input_ids"].shape
            assert b["pixel_values"].shape == (B, 3, 64, 64) and b["pixel_values"].dtype == torch.float32
            assert b["input_ids"].dtype == torch.int64 and b["attention_mask"].dtype == torch.bool
            assert b["attention_mask"].shape == (B, T) and len(b["key"]) == B
            assert b["item_id"].dtype == torch.int64 and b["item_id"].shape == (B,)
            assert b["gt_patch_mask"].dtype == torch.bool and b["gt_patch_mask"].shape == (B, 64)
            assert b["gt_token_mask"].dtype == torch.bool and b["gt_token_mask"].shape == (B, T)
            assert not (b["gt_token_mask"] & ~b["attention_mask"]).any()
            assert not b["gt_token_mask"][:, 0].any(), "BOS must not be in the token ground truth"
            assert (b["item_id"] == torch.tensor([int(k.split("_")[0]) for k in b["key"]])).all()
            keys += b["key"]
    assert sorted(keys) == _all_keys(out, man), "every pair exactly once across the two workers"
    t = loader.stats.totals()
    assert t["yielded"] == PAIRS and t["skipped"] == 0 and t["gt_mismatch"] == 0
    assert loader.last_report.startswith(f"reader: {PAIRS} samples")
    assert any("reader:" in r.getMessage() for r in caplog.records)


def test_token_gt_marks_visible_described_words(shards, tok):
    out, man = shards
    samples = _read_tar(os.path.join(out, man["shards"][1]))
    keys = sorted(samples)[:8]
    metas = [json.loads(samples[k]["json"]) for k in keys]
    caps = [samples[k]["txt"].decode() for k in keys]
    imgs = [Image.open(io.BytesIO(samples[k]["png"])) for k in keys]
    b = collate_pairs(imgs, caps, tok, 64, 8, metas=metas, keys=keys)
    for i, meta in enumerate(metas):
        n = len(meta["words"])
        assert b["gt_token_mask"][i, 1:n + 1].tolist() == [bool(f) for f in meta["word_flags"]]
        assert not b["gt_token_mask"][i, n + 1:].any()
        toks = tok.convert_ids_to_tokens(b["input_ids"][i][b["gt_token_mask"][i]].tolist())
        inter = [meta["objects"][j] for j in meta["intersection"]]
        vis_words = {str(o[f]) for o in inter for f in ("shape", "color", "size")}
        vis_words |= {sw.ROWS[o["row"]] for o in inter} | {sw.COLS[o["col"]] for o in inter}
        assert {t[:-4] for t in toks} <= vis_words


def test_reader_matches_collate_pairs_and_resizes(shards, tok):
    out, man = shards
    url = os.path.join(out, man["shards"][2])
    b = next(iter(PairDataset(url, tok, batch_size=SHARD)))
    samples = _read_tar(url)
    imgs = [Image.open(io.BytesIO(samples[k]["png"])) for k in b["key"]]
    metas = [json.loads(samples[k]["json"]) for k in b["key"]]
    c = collate_pairs(imgs, [samples[k]["txt"].decode() for k in b["key"]], tok, 64, 8, metas=metas, keys=b["key"])
    for k in b:
        if torch.is_tensor(b[k]):
            assert torch.equal(b[k], c[k]), k
    # at half resolution, 8-px patches see what 16-px patches see at full resolution
    small = next(iter(PairDataset(url, tok, image_size=32, patch_size=8, batch_size=SHARD)))
    big16 = next(iter(PairDataset(url, tok, image_size=64, patch_size=16, batch_size=SHARD)))
    assert small["pixel_values"].shape[-1] == 32 and small["gt_patch_mask"].shape == (SHARD, 16)
    assert torch.equal(small["gt_patch_mask"], big16["gt_patch_mask"])
    assert torch.equal(big16["gt_patch_mask"], b["gt_patch_mask"].view(-1, 4, 2, 4, 2).any(4).any(2).flatten(1))


def test_brace_pipe_and_node_split(shards, tok):
    out, man = shards
    paths = [os.path.join(out, n) for n in man["shards"]]
    assert expand_urls(os.path.join(out, "shard-{000000..000003}.tar")) == paths
    assert expand_urls("::".join(paths[:2])) == paths[:2]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_urls(os.path.join(out, "shard-{000000..000009}.tar"))
    pipe = [f"pipe:cat {p}" for p in paths[:2]]
    keys = [k for b in PairDataset(pipe, tok, batch_size=50) for k in b["key"]]
    assert sorted(keys) == sorted(k for p in paths[:2] for k in _read_tar(p))
    parts = []
    for rank in range(2):
        ds = PairDataset(paths, tok, batch_size=50, rank=rank, world_size=2, shard_shuffle=True, seed=5)
        parts.append({k for b in ds for k in b["key"]})
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == PAIRS
    with pytest.raises(ValueError, match="rank"):
        PairDataset(paths, tok, rank=2, world_size=2)


def test_shuffle_buffer_is_seeded(shards, tok):
    out, man = shards
    url = os.path.join(out, man["shards"][0])

    def order(seed):
        return [k for b in PairDataset(url, tok, batch_size=7, shuffle_buffer=16, seed=seed) for k in b["key"]]

    a, b, c = order(1), order(1), order(2)
    assert a == b and a != c and sorted(a) == sorted(c)
    assert a != sorted(a)


def _png(color=(255, 0, 0), size=(64, 48)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(size=(80, 64)):
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 128, 255)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_and_counted(tmp_path, shards, tok):
    out, man = shards
    good = os.path.join(out, man["shards"][0])
    bad = str(tmp_path / "bad-000000.tar")
    _write_tar(bad, [
        ("ok1.jpg", _jpg()), ("ok1.txt", b"a photo of a blue card"),
        ("corrupt.png", b"\x89PNG\r\n\x1a\n garbage"), ("corrupt.txt", b"broken image"),
        ("empty.png", _png()), ("empty.txt", b"   \n"),
        ("nocap.png", _png()),
        ("noimg.txt", b"a caption without an image"),
        ("badjson.png", _png()), ("badjson.txt", b"fine caption"), ("badjson.json", b"{not json"),
        ("ok2.webp", _png()), ("ok2.txt", "a red rectangle, café".encode()), ("ok2.json", b'{"url": "x"}'),
    ])
    # a shard cut in the middle of a member: the intact samples before the cut are kept
    with open(good, "rb") as f:
        data = f.read()
    with tarfile.open(good) as tar:
        members = tar.getmembers()
    cut = members[len(members) // 2]  # cut inside this member's data
    assert cut.size > 10
    trunc = str(tmp_path / "trunc-000000.tar")
    with open(trunc, "wb") as f:
        f.write(data[: cut.offset_data + cut.size // 2])
    junk = str(tmp_path / "junk-000000.tar")
    with open(junk, "wb") as f:
        f.write(b"this is not a tar file at all" * 40)
    # LAION-style samples next to ShapesWorld ones: by default ("auto" -> "require", as the
    # ShapesWorld shard has ground truth) the LAION ones are skipped as missing ground truth
    auto = make_loader([bad, trunc, junk], tok, batch_size=4)
    assert auto.dataset.ground_truth == "require"
    assert not {"ok1", "ok2"} & {k for b in auto for k in b["key"]}
    assert auto.stats.totals()["missing_ground_truth"] >= 2
    loader = make_loader([bad, trunc, junk], tok, num_workers=2, batch_size=4, ground_truth="none")
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    t = loader.stats.totals()
    assert {"ok1", "ok2"} <= set(keys)
    # the truncated shard may end in a partial sample (image without caption): >= 1
    assert t["corrupt_image"] == 1 and t["empty_caption"] == 1 and t["missing_caption"] >= 1
    assert t["missing_image"] >= 1 and t["bad_json"] == 1 and t["read_error"] >= 2
    assert t["yielded"] == len(keys) and len(keys) >= 2 + SHARD // 2 - 2
    assert t["seen"] == t["yielded"] + t["skipped"] - t["read_error"]
    for b in batches:
        if "ok1" in b["key"] or "ok2" in b["key"]:
            assert "gt_patch_mask" not in b and "item_id" not in b, "LAION-style samples have no ground truth"
    assert "corrupt image 1" in loader.last_report and "empty caption 1" in loader.last_report


def test_laion_style_resize_crop(tmp_path, tok):
    p = str(tmp_path / "laion-000000.tar")
    _write_tar(p, [("a.jpg", _jpg((120, 60))), ("a.txt", b"wide"), ("b.png", _png(size=(30, 90))), ("b.txt", b"tall")])
    b = next(iter(PairDataset(p, tok, image_size=32, batch_size=2, crop="random", seed=3)))
    assert b["pixel_values"].shape == (2, 3, 32, 32) and set(b) == {"pixel_values", "input_ids", "attention_mask",
                                                                     "key"}
    n = b["attention_mask"].sum(1)
    assert (b["input_ids"][:, 0] == tok.bos_token_id).all() and (b["input_ids"][[0, 1], n - 1] == tok.eos_token_id).all()


def test_collate_pairs_in_memory(tok):
    imgs = [Image.new("RGB", (64, 64), (10, 20, 30)), Image.new("RGB", (100, 64), (200, 20, 30))]
    b = collate_pairs(imgs, ["a red star", "a large blue circle at top left"], tok, image_size=64)
    assert b["pixel_values"].shape == (2, 3, 64, 64) and b["input_ids"].shape == (2, 9)
    assert b["attention_mask"].sum(1).tolist() == [5, 9] and b["key"] == ["0", "1"]
    assert set(b) == {"pixel_values", "input_ids", "attention_mask", "key"}
    mean = torch.tensor(ImageTransform().mean)
    std = torch.tensor(ImageTransform().std)
    px = b["pixel_values"][0, :, 0, 0] * std + mean
    assert torch.allclose(px * 255, torch.tensor([10.0, 20.0, 30.0]), atol=1e-3)
    with pytest.raises(ValueError, match="images/captions"):
        collate_pairs(imgs, ["one"], tok)
    with pytest.raises(ValueError, match="patch_size"):
        collate_pairs(imgs, ["a", "b"], tok, image_size=64, patch_size=7)


def test_token_gt_follows_words_split_into_several_tokens(tok):
    """A word outside the vocabulary tokenises into byte-level pieces: its flag covers every
    piece, later words stay aligned, and the sample is no mismatch."""
    assert len(tok("zq", add_special_tokens=False)["input_ids"]) == 2
    assert len(tok("blob", add_special_tokens=False)["input_ids"]) == 3
    assert len(tok("xy", add_special_tokens=False)["input_ids"]) == 2
    words = [["a", "red", "zq", "circle"], ["xy", "at", "top", "and", "a", "blob"]]
    flags = [[0, 1, 1, 0], [0, 0, 1, 0, 0, 1]]
    caps = [" ".join(w) for w in words]
    imgs = [Image.new("RGB", (64, 64), (10, 20, 30))] * 2
    stats = ReaderStats()
    metas = [{"words": w, "word_flags": f} for w, f in zip(words, flags)]
    b = collate_pairs(imgs, caps, tok, image_size=64, metas=metas, stats=stats)
    assert stats.totals()["gt_mismatch"] == 0
    #         BOS    a      red   z     q     circle EOS   pad    pad    pad    pad
    row0 = [False, False, True, True, True, False, False, False, False, False, False]
    #         BOS    x      y      at     top   and    a      bl    o     b     EOS
    row1 = [False, False, False, False, True, False, False, True, True, True, False]
    assert b["attention_mask"].sum(1).tolist() == [7, 11]
    assert b["gt_token_mask"].tolist() == [row0, row1]


def test_reader_stats_shared_across_workers():
    st = ReaderStats()
    st.add("seen", 3)
    st.add("corrupt_image")
    t = st.totals()
    assert t["seen"] == 3 and t["skipped"] == 1
    assert "corrupt image 1" in st.report()
    st.reset()
    assert st.totals()["seen"] == 0


def test_token_gt_truncation_and_mismatch(tmp_path, tok):
    samples = [sw.make_pair(2, i, 0) for i in range(4)]
    key, png, cap, meta = samples[1]
    samples[1] = (key, png, cap + " and extra", meta)            # caption no longer matches its words
    bad_occ = dict(samples[2][3])
    bad_occ["objects"] = [dict(o, occupancy="zz" if o["occupancy"] else None) for o in bad_occ["objects"]]
    samples[2] = samples[2][:3] + (bad_occ,)                    # unreadable occupancy -> bad json
    p = str(tmp_path / "gt-000000.tar")
    sw.write_samples(p, samples)
    ds = PairDataset(p, tok, batch_size=8, max_length=10)
    b = next(iter(ds))
    t = ds.stats.totals()
    assert t["gt_mismatch"] == 1 and t["bad_json"] == 1 and t["yielded"] == 3
    assert b["input_ids"].shape[1] == 10 and b["key"] == [samples[0][0], samples[1][0], samples[3][0]]
    assert not b["gt_token_mask"][1].any(), "an unaligned sample gets an all-False token mask"
    for row, s in ((0, samples[0]), (2, samples[3])):
        assert b["gt_token_mask"][row, 1:9].tolist() == [bool(f) for f in s[3]["word_flags"][:8]]
        assert not b["gt_token_mask"][row, 9]
