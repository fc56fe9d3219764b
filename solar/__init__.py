"""solar: the SOLAR method (two training stages, data pipeline, sym-MM2MM benchmark),
built only on solar_kernels' public API."""

__version__ = "0.1.0"

__all__ = ["encode", "Retriever", "load", "__version__"]


def __getattr__(name):
    # lazy: `python -m solar.data.shapesworld` etc. do not pay for torch/model imports
    if name in ("encode", "Retriever", "load"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'solar' has no attribute {name!r}")
