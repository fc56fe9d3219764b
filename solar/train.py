"""`python -m solar.train`: the main job.

With no arguments (preset `tiny`): generate ShapesWorld into the cache folder if it is
not there, build the sym-MM2MM benchmark if it is not there, train stage 1, stage 2 and
the CLIP-SF baseline (same data, same number of steps), evaluate SOLAR, SOLAR after
stage 1 only and CLIP-SF on the benchmark, and print the results table.

    python -m solar.train                          # everything, tiny preset
    python -m solar.train --stage 1                # stage 1 only
    python -m solar.train --stage 2 --run.stage1_ckpt runs/solar/stage1/stage1_model
    python -m solar.train --resume                 # continue an interrupted run
    python -m solar.train --stage2.steps 400 --data.cache_dir /data/solar
    torchrun --nproc_per_node=8 -m solar.train --preset clip-b16 --data.train_shards 'laion/{00000..01000}.tar'

Every config field is a flag (`--help` lists them).  Output in --run.out_dir:
config.json, metrics.jsonl, curves.png (losses and mask IoU), stage1/, stage2/,
clip_sf/ (checkpoints and final models), results.json and results.md.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import sys
import time
from typing import Optional

import torch

from .baselines import run_clip_sf
from .benchmark import BenchmarkError
from .checkpoint import CheckpointError, recover_interrupted_save
from .cli import parse_args
from .config import TrainConfig, config_to_dict
from .data.batches import PairBank
from .data.prepare import describe_data, phase_data, prepare_data, prepare_val_benchmark, training_data
from .distributed import DistInfo, barrier, init_distributed, resolve_device
from .logging import MetricsLogger, plot_metrics
from .mining import PoolSource
from .model import SolarModel
from .towers import TokenizerMismatch, check_tokenizer, default_tokenizer, pretrained_text_config
from .stage1 import run_stage1
from .stage2 import run_stage2
from .trainer import LoopOptions

__all__ = ["main", "run", "build_model", "load_stage1", "model_dir", "loop_options", "clip_sf_steps", "val_scorer",
           "PHASES"]

PHASES = ("stage1", "stage2", "clip_sf", "zero_shot")
EMBED_FILE = "solar_embedding.json"


def _say(di: DistInfo, *a):
    if di.is_main:
        print(*a, flush=True)


# --------------------------------------------------------------------------- loop

def loop_options(cfg: TrainConfig) -> LoopOptions:
    """The loop features run.* asks for (precision, activation checkpointing, micro-batches)."""
    r = cfg.run
    return LoopOptions(precision=r.precision, activation_checkpointing=r.activation_checkpointing,
                       micro_batches=r.micro_batches, progress=r.progress)


# --------------------------------------------------------------------------- models

def build_model(cfg: TrainConfig, tokenizer, seed: int):
    """A fresh SolarModel for cfg.model (vocabulary and special ids from `tokenizer`, which the
    model then carries and saves).  A pretrained text tower must match `tokenizer`
    (`solar.towers.check_tokenizer`: TokenizerMismatch otherwise)."""
    mcfg = cfg.model
    if not mcfg.text_pretrained:
        mcfg = mcfg.with_tokenizer(tokenizer)
    torch.manual_seed(seed)
    model = SolarModel(mcfg)
    if mcfg.text_pretrained:
        check_tokenizer(tokenizer, model.text)
        model.cfg = dataclasses.replace(model.cfg.with_tokenizer(tokenizer), vocab_size=model.cfg.vocab_size)
    model.tokenizer = tokenizer
    return model


def model_dir(out_dir: str, phase: str) -> str:
    """Where a phase's final model is written."""
    if phase == "stage1":
        return os.path.join(out_dir, "stage1", "stage1_model")
    return os.path.join(out_dir, phase, "model")


def _write_kind(path: str, kind: str, steps: int) -> None:
    """The embedding-kind file, written to a temporary name and renamed (a crash never leaves
    a truncated one: it is what eval / encode read to know the embedding rule)."""
    tmp = os.path.join(path, EMBED_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"embedding": kind, "steps": steps}, fh)
    os.replace(tmp, os.path.join(path, EMBED_FILE))


def _phase_done(path: str, steps: int) -> bool:
    f = os.path.join(path, EMBED_FILE)
    if not os.path.isfile(f):
        return False
    try:
        with open(f) as fh:
            return json.load(fh).get("steps") == steps
    except (OSError, json.JSONDecodeError):
        return False


# --------------------------------------------------------------------------- phases

def load_stage1(cfg: TrainConfig, path: str, di) -> SolarModel:
    """The saved stage-1 model at `path`, ready for stage 2: saved models have LoRA folded in, so
    with cfg.model.lora_rank > 0 the towers get LoRA again (stage 2 adapts them afresh; a stage-2
    checkpoint written with LoRA then loads into it, as `--resume` needs)."""
    model = SolarModel.from_pretrained(path, map_location=di.device)
    if cfg.model.lora_rank > 0:
        m = cfg.model
        model.enable_lora(m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets)
    return model


def run_phase_stage1(cfg, data, tokenizer, di, log, pool=None):
    """Stage 1 from a fresh model (or its finished model when resuming a completed phase)."""
    out = os.path.join(cfg.run.out_dir, "stage1")
    final = model_dir(cfg.run.out_dir, "stage1")
    if cfg.run.resume and _phase_done(final, cfg.stage1.steps):
        _say(di, f"[stage1] done already: {final}")
        return load_stage1(cfg, final, di)
    model = build_model(cfg, tokenizer, cfg.run.seed).to(di.device)
    # a rotation a kill interrupted leaves only ckpt.old / ckpt.tmp: finish it before asking
    resume = cfg.run.resume and recover_interrupted_save(os.path.join(out, "ckpt"))
    gt_src = pool if pool is not None else (data if isinstance(data, PairBank) else None)
    if isinstance(gt_src, PoolSource):
        eval_batches = gt_src.eval_batches(4, 128)
    else:
        eval_batches = [b for b in itertools.islice(gt_src.iter_chunks(128), 4)] \
            if gt_src is not None and "gt_patch_mask" in gt_src.fields and "gt_token_mask" in gt_src.fields else None
    # under torchrun every rank trains on its share of each global batch; the losses and QDA
    # thresholds are the global batch's
    run_stage1(model, phase_data(data, cfg.data.batch_size, 1), cfg.stage1, out_dir=out, resume=resume, log=log,
               eval_loader=eval_batches, progress=cfg.run.progress and di.is_main, dist_info=di,
               global_batch=cfg.data.batch_size, options=loop_options(cfg))
    if di.is_main:
        _write_kind(final, "solar", cfg.stage1.steps)
    barrier()
    return model


def val_scorer(cfg, val_bench: Optional[str], di):
    """`score(model) -> validation Avg` (fp32 index, SOLAR embedding) for stage 2's checkpoint
    selection (`stage2.select_every`), or None when there is nothing to select with.  The
    benchmark is loaded and verified once; rank 0 scores (`solar.selection` broadcasts it)."""
    if cfg.stage2.select_every <= 0 or val_bench is None:
        return None
    from . import benchmark as bm
    from .evaluate import evaluate_models
    bench = bm.verify_benchmark(bm.load_benchmark(val_bench)) if di.is_main else None
    m = cfg.model

    def score(model) -> float:
        with torch.no_grad():
            r = evaluate_models({"m": (model, "solar")}, bench, tokenizer=None, image_size=m.image_size,
                                patch_size=m.patch_size, max_length=m.max_text_len, batch_size=cfg.eval.batch_size,
                                index_dtypes=("fp32",), device=di.device, progress=False)
        return float(r["models"]["m"]["fp32"]["Avg"])
    return score


def run_phase_stage2(cfg, data, stage1_model, di, log, pool=None, val_bench: Optional[str] = None):
    """Stage 2 from the stage-1 model (its frozen copy builds the views); with
    stage2.select_every > 0 the stage-2 model is its best snapshot on the validation benchmark
    `val_bench` (never the test one)."""
    final = model_dir(cfg.run.out_dir, "stage2")
    if cfg.run.resume and _phase_done(final, cfg.stage2.steps):
        _say(di, f"[stage2] done already: {final}")
        return SolarModel.from_pretrained(final, map_location=di.device)
    teacher = copy.deepcopy(stage1_model).to(di.device)
    if cfg.stage2.init_from_stage1:
        model = copy.deepcopy(stage1_model).to(di.device)
    else:
        torch.manual_seed(cfg.run.seed + 2)
        model = SolarModel(stage1_model.cfg).to(di.device)
        model.tokenizer = stage1_model.tokenizer
        model.load_state_dict({k: v for k, v in stage1_model.state_dict().items()
                               if k.startswith(("tau_", "qda_"))}, strict=False)
    torch.manual_seed(cfg.run.seed + 2)
    out = os.path.join(cfg.run.out_dir, "stage2")
    run_stage2(model, phase_data(data, cfg.stage2.batch_size, 2), cfg.stage2, out_dir=out, resume=cfg.run.resume,
               log=log, seed=cfg.run.seed, dist_info=di, teacher=teacher, ckpt_every=cfg.run.ckpt_every,
               log_every=cfg.run.log_every, progress=cfg.run.progress, pool=pool, options=loop_options(cfg),
               select_score=val_scorer(cfg, val_bench, di))
    if di.is_main:
        model.save_pretrained(final)
        _write_kind(final, "solar", cfg.stage2.steps)
    barrier()
    return model


def clip_sf_steps(cfg) -> int:
    """CLIP-SF's budget: stage1.steps + stage2.steps unless set explicitly."""
    b = cfg.baseline
    return b.clip_sf_steps if b.clip_sf_steps >= 0 else cfg.stage1.steps + cfg.stage2.steps


def run_phase_clip_sf(cfg, data, tokenizer, di, log):
    """The CLIP-SF baseline from a fresh model, with stage 1's optimisation settings."""
    steps = clip_sf_steps(cfg)
    final = model_dir(cfg.run.out_dir, "clip_sf")
    if cfg.run.resume and _phase_done(final, steps):
        _say(di, f"[clip_sf] done already: {final}")
        return SolarModel.from_pretrained(final, map_location=di.device)
    model = build_model(cfg, tokenizer, cfg.run.seed).to(di.device)
    torch.manual_seed(cfg.run.seed + 3)
    b = cfg.baseline
    run_clip_sf(model, phase_data(data, cfg.data.batch_size, 3), steps=steps, global_batch=cfg.data.batch_size,
                lr=b.clip_sf_lr if b.clip_sf_lr > 0 else cfg.stage1.lr, temperature=b.clip_sf_temperature,
                out_dir=os.path.join(cfg.run.out_dir, "clip_sf"), resume=cfg.run.resume, log=log, dist_info=di,
                warmup=cfg.stage1.warmup_steps, weight_decay=cfg.stage1.weight_decay, grad_clip=cfg.stage1.grad_clip,
                ckpt_every=cfg.run.ckpt_every, log_every=cfg.run.log_every, progress=cfg.run.progress,
                options=loop_options(cfg))
    if di.is_main:
        model.save_pretrained(final)
        _write_kind(final, "clip_sf", steps)
    barrier()
    return model


def run_phase_eval(cfg, models: dict, tokenizer, bench: str, val_bench: Optional[str], di, log, timings: dict,
                   t_start: float) -> dict:
    """Evaluate {name: (model, kind)} on the test benchmark (and the validation benchmark when
    there is one), write results.json / results.md into run.out_dir, print the table and log
    the fp32 metrics.  Runs on rank 0 only; returns the results dict."""
    from .evaluate import evaluate_models, format_table
    out = cfg.run.out_dir
    t = time.time()
    ekw = dict(tokenizer=None, image_size=cfg.model.image_size, patch_size=cfg.model.patch_size,
               max_length=cfg.model.max_text_len, batch_size=cfg.eval.batch_size,
               index_dtypes=cfg.eval.index_dtypes, device=di.device, progress=cfg.run.progress)
    results = evaluate_models(models, bench, **ekw)
    if val_bench is not None:
        # the validation benchmark: the one to compare settings on (the test table is for reporting)
        results["val"] = evaluate_models(models, val_bench, **ekw)
    timings["eval_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start
    results["timings"] = timings
    results["config"] = config_to_dict(cfg)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    table = format_table(results)
    if "val" in results:
        table = "VALIDATION (model selection)\n" + format_table(results["val"]) + "\nTEST\n" + table
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(table + "\n")
    print(table, flush=True)
    log({"event": "results", **{f"{m}/{k}": v for m, r in results["models"].items()
                                for k, v in r.get("fp32", {}).items() if isinstance(v, (int, float))}},
        stage="eval", step=0)
    return results


def run_phase_zero_shot(cfg, tokenizer, di):
    """Zero-shot CLIP-SF: the pretrained towers as loaded, no training (their own projection
    heads; `solar.baselines.zero_shot_embed`), saved as a model folder; None, with a note, for
    towers without such heads (e.g. DINOv2)."""
    model = build_model(cfg, tokenizer, cfg.run.seed)
    if not model.cfg.tower_projections:
        _say(di, f"[zero_shot] skipped: the {model.cfg.vision_tower_class} / {model.cfg.text_tower_class} towers "
                 f"came without image-text projection heads")
        return None
    final = model_dir(cfg.run.out_dir, "zero_shot")
    if di.is_main:
        model.save_pretrained(final)
        _write_kind(final, "clip_zs", 0)
    barrier()
    return model.to(di.device)


# --------------------------------------------------------------------------- main

def _setup(cfg: TrainConfig) -> DistInfo:
    if cfg.run.num_threads > 0:
        torch.set_num_threads(cfg.run.num_threads)
    di = init_distributed(cfg.run.device)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.run.seed)
    return di


def run(cfg: TrainConfig) -> dict:
    """Run the job `cfg` describes; returns {"results": ..., "seconds": ...} (results on rank 0)."""
    t_start = time.time()
    di = _setup(cfg)
    out = cfg.run.out_dir
    if cfg.run.stage not in ("1", "2", "all"):
        raise ValueError(f"run.stage: expected '1', '2' or 'all', got {cfg.run.stage!r}")
    if di.is_main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump(config_to_dict(cfg), fh, indent=1)
    barrier()
    # a fresh run starts a fresh metrics file; --resume and --stage 2 (after --stage 1) append
    log = MetricsLogger(os.path.join(out, "metrics.jsonl"), enabled=di.is_main,
                        truncate=not cfg.run.resume and cfg.run.stage != "2")
    tokenizer = default_tokenizer(cfg.model, cfg.data.tokenizer)
    if cfg.model.text_pretrained:   # before any data is prepared
        tower_class, tower_config = pretrained_text_config(cfg.model)
        check_tokenizer(tokenizer, config=tower_config, class_name=tower_class)
    urls, bench = prepare_data(cfg, di)
    val_bench = prepare_val_benchmark(cfg, di, bench)
    bank, pool = training_data(urls, tokenizer, cfg, di)
    _say(di, describe_data(bank, pool, urls, bench, di))
    timings = {}
    stage1_model = stage2_model = clip_model = None
    if cfg.run.stage in ("1", "all"):
        t = time.time()
        stage1_model = run_phase_stage1(cfg, bank, tokenizer, di, log, pool)
        timings["stage1_s"] = time.time() - t
    if cfg.run.stage in ("2", "all"):
        if stage1_model is None:
            stage1_model = load_stage1(cfg, cfg.run.stage1_ckpt or model_dir(out, "stage1"), di)
        t = time.time()
        stage2_model = run_phase_stage2(cfg, bank, stage1_model, di, log, pool, val_bench)
        timings["stage2_s"] = time.time() - t
    if cfg.run.stage == "all" and cfg.baseline.clip_sf:
        t = time.time()
        clip_model = run_phase_clip_sf(cfg, bank, tokenizer, di, log)
        timings["clip_sf_s"] = time.time() - t
    zs_model = None
    if cfg.run.stage == "all" and cfg.baseline.zero_shot and (cfg.model.vision_pretrained or cfg.model.text_pretrained):
        zs_model = run_phase_zero_shot(cfg, tokenizer, di)
    results = {}
    if cfg.run.stage == "all" and cfg.eval.run and di.is_main:
        models = {"SOLAR": (stage2_model, "solar")}
        if cfg.baseline.stage1_only:
            models["SOLAR stage 1 only"] = (stage1_model, "solar")
        if clip_model is not None:
            models["CLIP-SF"] = (clip_model, "clip_sf")
        if zs_model is not None:
            models["CLIP-SF zero-shot"] = (zs_model, "clip_zs")
        if cfg.data.synthetic_ok and not cfg.data.bench_dir:
            print("[eval] benchmark: ShapesWorld (synthetic; --data.synthetic_ok), not real data", flush=True)
        results = run_phase_eval(cfg, models, tokenizer, bench, val_bench, di, log, timings, t_start)
    if di.is_main:
        png = plot_metrics(os.path.join(out, "metrics.jsonl"), os.path.join(out, "curves.png"))
        print(f"[done] {time.time() - t_start:.0f} s; outputs in {out}" + (f" (curves: {png})" if png else ""),
              flush=True)
    barrier()
    return {"results": results, "seconds": time.time() - t_start}


def main(argv: Optional[list] = None) -> int:
    """Command-line entry point (see the module docstring)."""
    cfg = parse_args(argv)   # bad flags / --config values: exit status 2 with argparse's error line
    try:
        # the device string is checked by parse_args; whether this machine has it, here
        resolve_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")), name="--run.device")
    except ValueError as e:
        print(f"solar.train: error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except (CheckpointError, FileNotFoundError, BenchmarkError, TokenizerMismatch) as e:
        print(f"solar.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
