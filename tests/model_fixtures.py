"""A tiny untrained SOLAR model folder, shared by the tests that need one on disk (the index
CLI, fault injection, the curation pipeline and its review page)."""
import json
import os

import torch

from solar.data.tokenizer import load_tokenizer
from solar.model import ModelConfig, SolarModel


def tiny_model_folder(path, image_size: int = 32) -> str:
    """Write a tiny untrained model at `path` as `solar.train` writes one (weights, config, the
    ShapesWorld tokenizer and solar_embedding.json); seeded, so every call writes the same
    weights.  Returns the path as a string."""
    tok = load_tokenizer("shapesworld", model_max_length=40)
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=image_size, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                      vision_mlp=64, max_text_len=40, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64,
                      width=32, adapter_hidden=32, fusion_layers=1, fusion_heads=2, fusion_mlp=64,
                      embed_dim=16).with_tokenizer(tok)
    path = os.fspath(path)
    SolarModel(cfg).save_pretrained(path)
    with open(os.path.join(path, "solar_embedding.json"), "w") as fh:
        json.dump({"embedding": "solar", "steps": 0}, fh)
    return path
