"""Shared set-up of the pipeline tests: a small ShapesWorld catalogue (item ids known) and a tiny model.

The catalogue is ShapesWorld written with three views per item (the last item has one view
only: a single-view item the pipeline must use as a distractor, never as a triplet); one
view's caption is replaced by text with HTML in it, to check that the review page shows
data as text."""
import io
import json
import os
import tarfile

from model_fixtures import tiny_model_folder
from solar.data import shapesworld as sw

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
    """A tiny untrained SOLAR model folder, ``out/model`` (`model_fixtures.tiny_model_folder`)."""
    return tiny_model_folder(os.path.join(out, "model"), image_size=SIZE)


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
