"""Drop-in adapters for the libraries people already train and search with.

Each submodule imports its peer library only when used, and each peer is an optional extra
of the package (``pip install solar-kernels[open_clip]`` etc.; see the README):

* :mod:`solar_kernels.integrations.open_clip` -- ``ClipLoss``, open_clip's loss module with
  the same constructor and forward, computed by :func:`solar_kernels.contrastive_loss` in
  O(N x D) memory.
* :mod:`solar_kernels.integrations.sentence_transformers` -- ``SolarRankingLoss``, a
  sentence-transformers loss over (anchor, positive, negative_1..n) columns with several
  positives per anchor, hardness weighting, gathering across ranks and mined hard negatives.
* :mod:`solar_kernels.integrations.faiss` -- exact conversion between
  :class:`solar_kernels.Index` and FAISS flat indexes (``Index.to_faiss`` / ``Index.from_faiss``).

Nothing here is imported by ``import solar_kernels``.
"""
