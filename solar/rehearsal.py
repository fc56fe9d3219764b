"""`python -m solar.rehearsal --out DIR [--run]`: the real-tower path (clip-b16 / dinov2-bge) rehearsed on CPU.

A real run points ``--model.vision_pretrained`` / ``--model.text_pretrained`` at downloaded
tower folders and ``--data.train_shards`` / ``--data.bench_dir`` at real data.  This module
writes stand-ins with the same formats, small enough for a CPU, so that exactly that command
can be tried (and is, in the test suite) before any GPU time is spent:

* ``towers/clip-b16/``: a ``CLIPModel`` (vision + text towers and CLIP's projection heads, as in
  openai/clip-vit-base-patch16) with ViT-B/16's layout -- 224 px images, 16 px patches, a
  causal 77-token text tower over CLIP's 49408-id vocabulary with BOS 49406 / EOS 49407 -- at
  reduced width and depth, random weights, written with ``save_pretrained``;
* ``towers/dinov2/`` + ``towers/xlmr/``: a DINOv2 vision tower (14 px patches) and an XLM-R text
  tower (BGE-m3's family: <s> = 0, <pad> = 1, </s> = 2) with a small word-level tokenizer
  saved next to it, likewise;
* ``shards/train-{000000..}.tar``: LAION-style webdataset shards (``jpg`` + ``txt`` + ``json``
  with url / caption / width / height, no ground truth) of 224 px JPEG renderings of
  ShapesWorld pairs whose captions are rewritten as sentences ("A photo of ...");
* ``bench/``: a 224 px benchmark (`solar.benchmark`).

Then it prints the training and evaluation commands of each preset (``--preset``, default both;
``--run``: runs them, training on 2 gloo processes with torchrun, then ``solar.eval`` on the
written models).  The tokenizer of the CLIP run is CLIP's real BPE
(`solar.data.tokenizer.clip_tokenizer`, from open_clip_torch's vocabulary file).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys

from .data import shapesworld as sw

__all__ = ["write_clip_towers", "write_dinov2_xlmr_towers", "sentence_caption", "write_laion_shards",
           "train_command", "eval_command", "prepare", "PRESETS", "main"]

IMAGE_SIZE = 224


def write_clip_towers(out: str, width: int = 64, layers: int = 2, heads: int = 2, seed: int = 0) -> str:
    """A random ``CLIPModel`` with ViT-B/16's layout at `width` / `layers`, saved in `out`."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=IMAGE_SIZE, patch_size=16),
        projection_dim=width)
    CLIPModel(cfg).save_pretrained(out)
    return out


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(words)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")


def write_dinov2_xlmr_towers(out_vision: str, out_text: str, width: int = 64, layers: int = 2, heads: int = 2,
                             seed: int = 0) -> tuple[str, str]:
    """A random DINOv2 vision tower and an XLM-R text tower (with a word-level tokenizer over
    ShapesWorld's and the sentence captions' words, XLM-R's special ids), saved in the two folders."""
    import torch
    from transformers import Dinov2Config, Dinov2Model, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                             num_attention_heads=heads, image_size=IMAGE_SIZE, patch_size=14)).save_pretrained(out_vision)
    tok = _word_tokenizer(list(sw.VOCABULARY) + _SENTENCE_WORDS)
    XLMRobertaModel(XLMRobertaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width,
                                     num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=130,
                                     bos_token_id=0, pad_token_id=1, eos_token_id=2),
                    add_pooling_layer=False).save_pretrained(out_text)
    tok.save_pretrained(out_text)
    return out_vision, out_text


_OPENERS = ["A photo of", "An image showing", "Picture of", "A close-up of", "A product shot with"]
_SENTENCE_WORDS = [w for o in _OPENERS for w in o.lower().split()] + ["close", "-", "up", "product", "shot", "with"]


def sentence_caption(caption: str, rng: random.Random) -> str:
    """A ShapesWorld caption as a LAION-like sentence: an opener, commas for "and", a capital
    letter and a full stop ("A photo of a small red circle at top left, a blue star ...")."""
    body = caption.strip().replace(" and ", ", ")
    return f"{rng.choice(_OPENERS)} {body}."


def write_laion_shards(out: str, pairs: int, shard_size: int, seed: int = 0, quality: int = 90) -> list[str]:
    """LAION-style shards (jpg + txt + json, no ground truth) of ShapesWorld pairs at 224 px."""
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    paths, samples = [], []
    for i in range(pairs):
        key, png, caption, _ = sw.make_pair(seed, i // 2, i % 2, image_size=IMAGE_SIZE)
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(buf, "JPEG", quality=quality)
        text = sentence_caption(caption, rng)
        meta = {"url": f"https://example.invalid/{key}.jpg", "caption": text, "width": IMAGE_SIZE,
                "height": IMAGE_SIZE, "key": key}
        samples.append((key, buf.getvalue(), text, meta))
        if len(samples) == shard_size or i == pairs - 1:
            paths.append(os.path.join(out, f"train-{len(paths):06d}.tar"))
            _write_tar(paths[-1], samples)
            samples = []
    return paths


def _write_tar(path: str, samples) -> None:
    import tarfile

    with tarfile.open(path + ".tmp", "w") as tar:
        for key, jpg, text, meta in samples:
            for ext, data in (("jpg", jpg), ("txt", text.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(path + ".tmp", path)


def train_command(root: str, preset: str = "clip-b16", nproc: int = 2, steps: int = 2, batch: int = 8) -> list[str]:
    """The `solar.train` command of the rehearsal: the preset, the folders written under `root`,
    and CPU-sized steps / batches / pools / fusion width (the embedding stays 768-d; everything
    else is the preset's).  For a real run drop the sizing flags and point at real folders."""
    if preset == "clip-b16":
        vision = text = os.path.join(root, "towers", "clip-b16")
    elif preset == "dinov2-bge":
        vision, text = os.path.join(root, "towers", "dinov2"), os.path.join(root, "towers", "xlmr")
    else:
        raise ValueError(f"preset: expected 'clip-b16' or 'dinov2-bge', got {preset!r}")
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    n = len([f for f in os.listdir(os.path.join(root, "shards")) if f.endswith(".tar")])
    return launch + [
        "-m", "solar.train", "--preset", preset, "--out", os.path.join(root, f"run-{preset}"),
        "--model.vision_pretrained", vision, "--model.text_pretrained", text,
        "--data.train_shards", os.path.join(root, "shards", f"train-{{000000..{n - 1:06d}}}.tar"),
        "--data.bench_dir", os.path.join(root, "bench"), "--data.val_bench", "false", "--data.num_workers", "0",
        "--model.width", "64", "--model.adapter_hidden", "64", "--model.fusion_heads", "2", "--model.fusion_mlp", "128",
        "--model.lora_rank", "4", "--data.batch_size", str(batch), "--stage2.batch_size", str(batch), "--eval.batch_size", "16",
        "--stage1.steps", str(steps), "--stage1.warmup_steps", "1", "--stage1.eval_every", "0",
        "--stage1.ckpt_every", str(steps), "--stage2.steps", str(steps), "--stage2.warmup_steps", "1",
        "--stage2.refresh_every", str(steps), "--stage2.mine_pool_size", "32", "--stage2.mine_k", "2",
        "--stage2.n_segments", "4", "--stage2.kmeans_iters", "2", "--baseline.clip_sf_steps", str(steps),
        "--run.device", "cpu", "--run.precision", "fp32", "--run.progress", "false", "--run.num_threads", "1",
        "--run.ckpt_every", str(steps), "--run.log_every", "1"]


def prepare(root: str, pairs: int = 96, shard_size: int = 24, triplets: int = 8, pool: int = 32,
            presets=("clip-b16", "dinov2-bge")) -> None:
    """Write the towers of `presets`, the training shards and the benchmark under `root` (see the
    module docstring); parts already there are kept."""
    from .benchmark import benchmark_exists, build_benchmark

    towers = os.path.join(root, "towers")
    if "clip-b16" in presets and not os.path.isdir(os.path.join(towers, "clip-b16")):
        write_clip_towers(os.path.join(towers, "clip-b16"))
    if "dinov2-bge" in presets and not os.path.isdir(os.path.join(towers, "xlmr")):
        write_dinov2_xlmr_towers(os.path.join(towers, "dinov2"), os.path.join(towers, "xlmr"))
    if not os.path.isdir(os.path.join(root, "shards")):
        write_laion_shards(os.path.join(root, "shards"), pairs, shard_size)
    if not benchmark_exists(os.path.join(root, "bench")):
        build_benchmark(os.path.join(root, "bench"), seed=5, triplets=triplets, pool=pool, image_size=IMAGE_SIZE,
                        progress=False)


PRESETS = ("clip-b16", "dinov2-bge")
_EVAL_MODELS = {"clip-b16": (("SOLAR", "stage2/model"), ("CLIP-SF", "clip_sf/model")),
                "dinov2-bge": (("SOLAR-B+D", "stage2/model"), ("CLIP-SF (B+D towers)", "clip_sf/model"))}


def eval_command(root: str, preset: str = "clip-b16") -> list[str]:
    """The `solar.eval` command over the models the rehearsal's run of `preset` writes (each
    folder brings its own tokenizer and pixel normalisation; the two presets' models are
    evaluated apart: their patch grids differ, 16 vs 14 px)."""
    if preset not in _EVAL_MODELS:
        raise ValueError(f"preset: expected one of {list(_EVAL_MODELS)}, got {preset!r}")
    ckpts = [x for name, sub in _EVAL_MODELS[preset]
             for x in ("--ckpt", f"{name}={os.path.join(root, f'run-{preset}', sub)}")]
    return [sys.executable, "-m", "solar.eval", "--bench", os.path.join(root, "bench"), "--device", "cpu",
            "--no-progress"] + ckpts


def main(argv=None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m solar.rehearsal", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the towers, shards, benchmark and runs")
    ap.add_argument("--preset", default="all", choices=PRESETS + ("all",),
                    help="the preset to rehearse (all: clip-b16, then dinov2-bge)")
    ap.add_argument("--nproc", type=int, default=2, help="gloo processes (torchrun); 1: a plain process")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps of each phase")
    ap.add_argument("--run", action="store_true", help="run the training and evaluation commands")
    a = ap.parse_args(argv)
    if a.nproc < 1 or a.steps < 1:
        ap.error(f"--nproc / --steps: expected >= 1, got {a.nproc} / {a.steps}")
    presets = PRESETS if a.preset == "all" else (a.preset,)
    prepare(a.out, presets=presets)
    cmds = [c for p in presets for c in (train_command(a.out, p, a.nproc, a.steps), eval_command(a.out, p))]
    for c in cmds:
        print(" ".join(c))
    if not a.run:
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for c in cmds:
        rc = subprocess.call(c, env=env)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
