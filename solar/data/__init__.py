"""Data: the ShapesWorld generator, the webdataset reader and the tokenisers.

* :mod:`solar.data.shapesworld` -- procedural pairs with known ground truth
  (``python -m solar.data.shapesworld --out DIR --pairs N --seed S``).
* :mod:`solar.data.reader` -- one reader for local / brace / ``pipe:`` webdataset shards,
  batches in the format documented there.
* :mod:`solar.data.samples` -- the batch builder both use: image transform, ground-truth
  masks, :func:`collate_pairs` for in-memory pairs, the reader's skip counters.
* :mod:`solar.data.batches` -- training data as the training loop reads it: ``PairBank``
  (in memory, deterministic batches), ``StreamBatches`` / ``ShardStreams`` (streaming shards).
* :mod:`solar.data.prepare` -- what a training run reads, from its config: the training shards
  (ShapesWorld generated when none are given), the test / validation benchmarks (built when
  absent), the in-memory or streamed training data and each phase's batches.
* :mod:`solar.data.tokenizer` -- CLIP's exact BPE and the ShapesWorld BPE, built offline,
  or any local tokenizer folder.

Names are imported lazily so that ``python -m solar.data.shapesworld`` runs the module once.
"""
import importlib

_EXPORTS = {
    "batches": ("PairBank", "StreamBatches", "ShardStreams", "load_pair_bank"),
    "prepare": ("VAL_ITEM_BASE_OFFSET", "bench_dir", "describe_data", "load_bank", "phase_data", "prepare_benchmark",
                "prepare_data", "prepare_val_benchmark", "shapesworld_dir", "training_data", "training_urls",
                "val_bench_dir"),
    "reader": ("PairDataset", "PairLoader", "expand_urls", "make_loader"),
    "samples": ("CLIP_MEAN", "CLIP_STD", "ImageTransform", "ReaderStats", "collate_pairs", "gt_patch_mask"),
    "shapesworld": ("BENCHMARK_ITEM_BASE", "VOCABULARY", "make_item", "make_pair", "write_shards"),
    "tokenizer": ("clip_tokenizer", "load_tokenizer", "model_tokenizer", "save_tokenizer", "shapesworld_tokenizer"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'solar.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
