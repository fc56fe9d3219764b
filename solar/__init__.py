"""solar: the SOLAR method (two training stages, data pipeline, sym-MM2MM benchmark),
built only on solar_kernels' public API."""

__version__ = "0.1.0"
