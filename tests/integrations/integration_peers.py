"""Load the optional peer libraries the integration tests compare against, or skip with why.

open_clip's package __init__ imports torchvision (model transforms), which this CPU
environment does not have: its loss module is loaded by file path instead, which runs only
``open_clip/loss.py`` (it needs torch alone).
"""
import importlib.util
import os

import pytest


def open_clip_loss_module():
    """open_clip's ``loss.py`` as a module (pip install --no-deps open_clip_torch), or skip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (bash run.sh installs it with --no-deps; "
                    "or: pip install --no-deps open_clip_torch)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss_under_test", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod
