"""Checkpoints as safetensors + JSON: loading one never executes code (no pickle).

A model directory holds ``config.json`` (the ModelConfig, with the resolved tower configs)
and ``model.safetensors`` (every parameter and buffer, including the stage-1 thresholds
tau_v / tau_l and the QDA statistics).  A training-state directory adds
``trainer.safetensors`` (optimizer tensors) and ``trainer.json`` (step, optimizer
hyper-parameters, scalar state, RNG seeds) and, when the phase keeps state per rank (the
streamed mining pool's shares), ``ranks/<r>/`` with rank r's files.  Writes go to a temporary name and are renamed
into place, so an interrupted save never leaves a half-written checkpoint behind.  Each json
file (written after its tensors) records the sha256 of its safetensors file, and loading
checks it: a flipped bit in the weights is a CheckpointError, not a model that silently
computes something else (directories written before the checksums load unchecked).

If a torch file must ever be read, use ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["save_model", "load_model_files", "load_state_strict", "save_training_state", "load_training_state",
           "rank_state_dir", "write_tensors", "read_tensors", "CheckpointError", "sha256_file", "fsync_path"]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
TOKENIZER_DIR = "tokenizer"   # = solar.data.tokenizer.TOKENIZER_SUBDIR
RANKS_DIR = "ranks"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the disk: a rename is only durable across
    a power loss once what it points to, and the folder holding it, are on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    fsync_path(tmp)
    os.replace(tmp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: Optional[dict] = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    fsync_path(tmp)
    os.replace(tmp, path)


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: Optional[dict] = None) -> None:
    """Write `tensors` (and string `meta`) as safetensors to `path`: a temporary name, fsync'd, renamed."""
    _atomic_tensors(Path(path), tensors, meta)


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors on the CPU, string metadata) of a safetensors file; CheckpointError when missing or unreadable."""
    from safetensors import safe_open
    path = Path(path)
    tensors = _read_tensors(path, "cpu")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return tensors, meta


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints here, benchmark shards in
    `solar.benchmark`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, meta: dict) -> None:
    """Compare `path` with the sha256 its json recorded (none recorded: nothing to check)."""
    want = (meta.get("sha256") or {}).get(path.name)
    if want is not None and path.is_file() and sha256_file(path) != want:
        raise CheckpointError(f"checkpoint: {path} does not match the sha256 recorded when it was written "
                              f"(corrupt or modified since)")


def save_model(model, directory: str | os.PathLike, *, merge_lora: bool = True) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the model's tokenizer (``tokenizer/``, when
    ``model.tokenizer`` is set) for a SolarModel into `directory`.

    With LoRA in the towers, `merge_lora` writes the weights with the LoRA deltas folded in and
    a config without LoRA (the folder loads without peft); ``merge_lora=False`` (training
    checkpoints) keeps the adapters as they are, so a resumed run continues them."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg.to_dict()
    if merge_lora and cfg.get("lora_rank", 0) > 0:
        state = model.merged_state_dict()
        cfg["lora_rank"] = 0
    else:
        state = model.state_dict()
    # tied / shared storages are not allowed by safetensors: clone every tensor
    _atomic_tensors(d / MODEL_FILE, {k: v.clone() for k, v in state.items()}, {"format": "pt", "solar": "model"})
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        tdir, tmp = d / TOKENIZER_DIR, d / (TOKENIZER_DIR + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        tok.save_pretrained(str(tmp))
        if tdir.exists():
            shutil.rmtree(tdir)
        os.replace(tmp, tdir)
    _atomic_json(d / CONFIG_FILE, {"solar_model_config": cfg, "sha256": {MODEL_FILE: sha256_file(d / MODEL_FILE)}})
    return d


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint: missing {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint: {path} is not valid JSON ({e})") from e


def _read_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint: missing {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint: {path} is not a readable safetensors file ({e})") from e


def load_model_files(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(ModelConfig dict, state dict on the CPU) of a directory written by ``save_model``;
    CheckpointError for a missing or corrupt one.  ``solar.model.load_model`` builds the model."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint: {d} is not a directory")
    meta = _read_json(d / CONFIG_FILE)
    if "solar_model_config" not in meta:
        raise CheckpointError(f"checkpoint: {d / CONFIG_FILE} has no 'solar_model_config' entry")
    _verify(d / MODEL_FILE, meta)
    return meta["solar_model_config"], _read_tensors(d / MODEL_FILE, "cpu")


def load_state_strict(model, state: dict[str, torch.Tensor], directory) -> None:
    """Load `state` into `model`; a missing or unexpected key is a CheckpointError naming `directory`."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint: {Path(directory) / MODEL_FILE} does not match the config: "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}")


def save_training_state(directory: str | os.PathLike, model, optimizer: Optional[torch.optim.Optimizer],
                        extra: dict, extra_tensors: Optional[dict[str, torch.Tensor]] = None,
                        rank_dir: Optional[str | os.PathLike] = None, rank_sha256: Optional[dict] = None) -> Path:
    """Save model + optimizer + JSON-serialisable `extra` (step, schedule state...) into `directory`.

    Written into ``directory.tmp`` first and renamed, so `directory` is always complete.
    `rank_dir`: a folder of per-rank subfolders ``<r>/`` that every rank has written (and
    fsync'd) before this call; it is moved into the checkpoint as ``ranks/`` before the
    trainer json, which records `rank_sha256` ({rank: {file name: sha256}}, hashed by each
    rank over its own files) for `rank_state_dir` to check.
    """
    d = Path(directory)
    tmp = d.with_name(d.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp, merge_lora=False)
    tensors: dict[str, torch.Tensor] = dict(extra_tensors or {})
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for pid, st in sd["state"].items():
            for name, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"opt.{pid}.{name}"] = val
                else:
                    scalars.setdefault(str(pid), {})[name] = val
        opt_meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    _atomic_tensors(tmp / TRAINER_TENSORS, tensors, {"format": "pt", "solar": "trainer"})
    meta = {"extra": extra, "optimizer": opt_meta, "sha256": {TRAINER_TENSORS: sha256_file(tmp / TRAINER_TENSORS)}}
    if rank_dir is not None:
        fsync_path(rank_dir)
        os.replace(rank_dir, tmp / RANKS_DIR)
        meta["ranks_sha256"] = {str(r): dict(h) for r, h in (rank_sha256 or {}).items()}
    _atomic_json(tmp / TRAINER_JSON, meta)
    fsync_path(tmp)
    if d.exists():
        old = d.with_name(d.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(d, old)
        os.replace(tmp, d)
        fsync_path(d.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, d)
        fsync_path(d.parent)
    return d


def recover_interrupted_save(directory: str | os.PathLike) -> bool:
    """Finish a checkpoint rotation that a crash interrupted; True when `directory` holds a
    checkpoint afterwards.

    ``save_training_state`` writes ``directory.tmp`` completely, then renames ``directory`` to
    ``directory.old``, ``directory.tmp`` to ``directory`` and removes ``directory.old``.  Killed
    between the two renames, only ``.old`` and ``.tmp`` are on disk: the newer, complete
    ``.tmp`` (its trainer json, written last, is there) becomes ``directory``, else ``.old`` goes
    back.  Killed after the second rename, the leftover ``.old`` is removed.
    """
    d = Path(directory)
    tmp, old = d.with_name(d.name + ".tmp"), d.with_name(d.name + ".old")
    if d.exists():
        if old.exists():
            shutil.rmtree(old)
        return True
    if not old.exists():
        return False
    if (tmp / TRAINER_JSON).is_file():
        os.replace(tmp, d)
        shutil.rmtree(old)
    else:
        os.replace(old, d)
    return True


def rank_state_dir(directory: str | os.PathLike, rank: int, world: int) -> Optional[Path]:
    """Rank `rank`'s folder ``ranks/<rank>`` of a checkpoint, its files checked against the
    sha256 recorded when it was written; None when the checkpoint holds no per-rank state or
    was written by another number of ranks than `world` (a rank's share is then not this
    rank's).  CheckpointError for a missing or modified file."""
    d = Path(directory)
    hashes = _read_json(d / TRAINER_JSON).get("ranks_sha256")
    if not hashes or len(hashes) != world:
        return None
    folder = d / RANKS_DIR / str(rank)
    for name, want in sorted(hashes.get(str(rank), {}).items()):
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint: missing {f}")
        if sha256_file(f) != want:
            raise CheckpointError(f"checkpoint: {f} does not match the sha256 recorded when it was written "
                                  f"(corrupt or modified since)")
    return folder


def load_training_state(directory: str | os.PathLike, model, optimizer: Optional[torch.optim.Optimizer]):
    """Load what ``save_training_state`` wrote into `model` (in place) and `optimizer`.

    Returns (extra dict, extra tensors dict).  Raises CheckpointError for a missing or corrupt
    directory, or an optimizer whose parameter groups do not match.
    """
    d = Path(directory)
    _, state = load_model_files(d)
    load_state_strict(model, state, d)
    meta = _read_json(d / TRAINER_JSON)
    _verify(d / TRAINER_TENSORS, meta)
    tensors = _read_tensors(d / TRAINER_TENSORS, "cpu")
    if optimizer is not None:
        om = meta.get("optimizer")
        if om is None:
            raise CheckpointError(f"checkpoint: {d} has no optimizer state")
        state: dict[int, dict] = {}
        for key, val in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = val
        for pid, sc in om["scalars"].items():
            state.setdefault(int(pid), {}).update(sc)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": om["param_groups"]})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint: optimizer state in {d} does not match this model ({e})") from e
    rest = {k: v for k, v in tensors.items() if not k.startswith("opt.")}
    return meta["extra"], rest
