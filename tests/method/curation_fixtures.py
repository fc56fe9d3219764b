"""Shared set-up of the pipeline tests: a small ShapesWorld catalogue (item ids known) and a tiny model.

The catalogue is ShapesWorld written with three views per item (the last item has one view
only: a single-view item the pipeline must use as a distractor, never as a triplet); one
view's caption is replaced by text with HTML in it, to check that the review page shows
data as text."""
import io
import json
import os
import tarfile

import torch

from solar.data import shapesworld as sw
from solar.data.tokenizer import load_tokenizer
from solar.model import ModelConfig, SolarModel

ITEMS, VIEWS, SIZE, SEED, OFFSET = 20, 3, 32, 3, 500
PAIRS = ITEMS * VIEWS + 1        # + one view of one more item
HOSTILE = 'large red circle <script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & more'
HOSTILE_KEY = sw.sample_key(OFFSET, 0)


def _append_caption(path: str, keys, text: str) -> None:
    tmp = path + ".edit"
    with tarfile.open(path) as src, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name.endswith(".txt") and m.name[:-4] in keys:
                data = data + b" " + text.encode("utf-8")
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    os.replace(tmp, path)


def make_catalogue(out: str, hostile_keys=(HOSTILE_KEY,)) -> str:
    """Write the catalogue into ``out``, HOSTILE appended to the captions of ``hostile_keys``;
    returns its brace pattern."""
    m = sw.write_shards(out, PAIRS, seed=SEED, shard_size=25, workers=1, image_size=SIZE, views_per_item=VIEWS,
                        item_offset=OFFSET, progress=False)
    for s in m["shards"]:
        _append_caption(os.path.join(out, s), set(hostile_keys), HOSTILE)
    return os.path.join(out, m["pattern"])


def make_model(out: str) -> str:
    """A tiny untrained SOLAR model folder as `solar.train` writes it (weights + solar_embedding.json)."""
    tok = load_tokenizer("shapesworld", model_max_length=40)
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=SIZE, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                      max_text_len=40, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64, width=32,
                      adapter_hidden=32, fusion_layers=1, fusion_heads=2, fusion_mlp=64,
                      embed_dim=16).with_tokenizer(tok)
    d = os.path.join(out, "model")
    SolarModel(cfg).save_pretrained(d)
    with open(os.path.join(d, "solar_embedding.json"), "w") as fh:
        json.dump({"embedding": "solar", "steps": 0}, fh)
    return d


def metas(shards_dir: str) -> dict:
    """{key: json} of every sample of the tars in a folder."""
    out = {}
    for n in sorted(os.listdir(shards_dir)):
        if n.endswith(".tar"):
            with tarfile.open(os.path.join(shards_dir, n)) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        out[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    return out
