"""Tokenisers: a CLIP-compatible BPE tokenizer built offline for ShapesWorld, or any local one.

:func:`shapesworld_tokenizer` builds, without any download, a byte-level BPE tokenizer in
CLIP's exact format (the 256 byte symbols and their ``</w>`` word-final forms first, then the
merge results, then ``<|startoftext|>`` and ``<|endoftext|>``; lower-casing and CLIP's
pre-tokenisation) whose merges make every word of ShapesWorld's closed vocabulary a single
token.  Words outside that vocabulary still tokenise (into byte-level pieces), so the same
tokenizer reads LAION-style captions too.  It is a ``transformers.CLIPTokenizer`` built from
an in-memory vocab and merge list; :func:`save_tokenizer` / ``save_pretrained`` writes it in
the usual ``vocab.json`` + ``merges.txt`` form.

:func:`load_tokenizer` accepts ``"shapesworld"`` or a local folder (``AutoTokenizer.
from_pretrained(path, local_files_only=True)``), e.g. a saved openai/clip-vit-base-patch16.
"""
from __future__ import annotations

import functools
import os

from .shapesworld import VOCABULARY

__all__ = ["bytes_to_unicode", "build_bpe", "shapesworld_tokenizer", "load_tokenizer", "save_tokenizer"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one (already byte-mapped) word: merge the lowest-ranked pair until none applies."""
    parts = list(word[:-1]) + [word[-1] + EOW]
    while len(parts) > 1:
        best, best_rank = None, None
        for pair in zip(parts, parts[1:]):
            r = ranks.get(pair)
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = pair, r
        if best is None:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_bpe(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format (vocab, merges) in which each of ``words`` (lower-case letters) is one token.

    Merges are added greedily: for each word, run BPE with the merges so far and, while it
    is not a single token, append the merge of its first two pieces.  A merge appended later
    has a lower priority than every earlier one, so it never changes how an earlier word
    tokenises (at each step of that word some earlier merge still applies).
    """
    byte_chars = list(bytes_to_unicode().values())
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for w in words:
        if not w or not w.isalpha() or w != w.lower():
            raise ValueError(f"words: expected non-empty lower-case letter words, got {w!r}")
        while True:
            parts = _bpe(w, ranks)
            if len(parts) == 1:
                break
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    vocab_list = byte_chars + [c + EOW for c in byte_chars]
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab_list.append(a + b)
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


@functools.lru_cache(maxsize=4)
def _cached_shapesworld(model_max_length: int):
    from transformers import CLIPTokenizer

    vocab, merges = build_bpe(VOCABULARY)
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)
    for w in VOCABULARY:  # the property the token-level ground truth relies on
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"ShapesWorld tokenizer splits {w!r} into {len(ids)} tokens")
    return tok


def shapesworld_tokenizer(model_max_length: int = 77):
    """The offline CLIP-compatible BPE tokenizer for ShapesWorld (each vocabulary word = 1 token).

    Cached per ``model_max_length``; returns a ``transformers.CLIPTokenizer`` with
    ``<|startoftext|>`` as BOS and ``<|endoftext|>`` as EOS and padding, like CLIP.
    """
    return _cached_shapesworld(int(model_max_length))


def load_tokenizer(name_or_path: str = "shapesworld", model_max_length: int | None = None):
    """``"shapesworld"`` -> :func:`shapesworld_tokenizer`; a local folder -> ``AutoTokenizer``.

    Never downloads (``local_files_only=True``); a missing folder is a clear error.
    """
    if name_or_path == "shapesworld":
        return shapesworld_tokenizer(model_max_length or 77)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"name_or_path: {name_or_path!r} is neither 'shapesworld' nor a local tokenizer "
                                "folder (downloads are disabled; save the tokenizer with save_pretrained first)")
    from transformers import AutoTokenizer

    kw = {} if model_max_length is None else {"model_max_length": model_max_length}
    return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, **kw)


def save_tokenizer(tokenizer, path: str) -> str:
    """Write ``tokenizer`` to folder ``path`` (``save_pretrained``) so :func:`load_tokenizer` reloads it."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(path)
    return path
