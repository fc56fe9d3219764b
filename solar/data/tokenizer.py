"""Tokenisers: CLIP's own BPE and a CLIP-format BPE for ShapesWorld, built offline, or any local one.

:func:`shapesworld_tokenizer` builds, without any download, a byte-level BPE tokenizer in
CLIP's exact format (the 256 byte symbols and their ``</w>`` word-final forms first, then the
merge results, then ``<|startoftext|>`` and ``<|endoftext|>``; lower-casing and CLIP's
pre-tokenisation) whose merges make every word of ShapesWorld's closed vocabulary a single
token.  Words outside that vocabulary still tokenise (into byte-level pieces), so the same
tokenizer reads LAION-style captions too.  It is a ``transformers.CLIPTokenizer`` built from
an in-memory vocab and merge list; :func:`save_tokenizer` / ``save_pretrained`` writes it in
the usual ``vocab.json`` + ``merges.txt`` form.

:func:`clip_tokenizer` builds CLIP's exact tokenizer (49408 ids, ``<|startoftext|>`` = 49406,
``<|endoftext|>`` = 49407, context 77) from the BPE merge list that the ``open_clip_torch``
package ships (``bpe_simple_vocab_16e6.txt.gz``), found on disk without importing open_clip
(its package imports torchvision).  CLIP cleans text before BPE (``ftfy.fix_text`` when
installed, HTML entities unescaped twice, whitespace collapsed, lower case); the transformers
tokenizer does only the last two, so the result is a :class:`CleanTextTokenizer` that applies
CLIP's cleaning in front of it.  Padding uses ``<|endoftext|>`` like transformers' CLIP
tokenizer (open_clip pads with 0; the attention mask makes the two equivalent).

:func:`load_tokenizer` accepts ``"shapesworld"``, ``"clip"`` or a local folder (``AutoTokenizer.
from_pretrained(path, local_files_only=True)``, with CLIP's cleaning again when the folder was
written by :func:`save_tokenizer` from a :class:`CleanTextTokenizer`).  Model folders carry
their tokenizer in a ``tokenizer/`` sub-folder (:func:`model_tokenizer`).
"""
from __future__ import annotations

import functools
import html
import importlib.util
import json
import os

from .shapesworld import VOCABULARY

__all__ = ["bytes_to_unicode", "build_bpe", "shapesworld_tokenizer", "clip_bpe_path", "clip_vocab_merges",
           "clip_tokenizer", "clip_clean", "CleanTextTokenizer", "load_tokenizer", "save_tokenizer",
           "model_tokenizer", "TOKENIZER_SUBDIR", "CLIP_VOCAB_SIZE", "CLIP_BOS_ID", "CLIP_EOS_ID", "CLIP_CONTEXT"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
CLIP_VOCAB_SIZE, CLIP_BOS_ID, CLIP_EOS_ID, CLIP_CONTEXT = 49408, 49406, 49407, 77
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_SUBDIR = "tokenizer"          # where a model folder keeps its tokenizer
MARKER_FILE = "solar_tokenizer.json"    # written by save_tokenizer: which cleaning to put in front


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


# ------------------------------------------------------------------------------- CLIP

def clip_bpe_path() -> str:
    """The path of CLIP's BPE merge list as shipped by the ``open_clip_torch`` package.

    Found with ``importlib.util.find_spec`` (which locates a top-level package without running
    its ``__init__``: open_clip's imports torchvision).  FileNotFoundError says how to install it.
    """
    spec = importlib.util.find_spec("open_clip")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        f = os.path.join(root, CLIP_BPE_FILE)
        if os.path.isfile(f):
            return f
    raise FileNotFoundError(f"CLIP's BPE vocabulary ({CLIP_BPE_FILE}) was not found: install the package that "
                            f"ships it with `pip install --no-deps open_clip_torch`, or pass a tokenizer folder "
                            f"(--data.tokenizer)")


def clip_vocab_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's (vocab, merges): the 256 byte symbols, their ``</w>`` forms, the results of the first
    48894 merges of the list (49152 - 256 - 2), then ``<|startoftext|>`` and ``<|endoftext|>``
    (49406, 49407) -- the layout of CLIP's ``SimpleTokenizer``."""
    import gzip

    with gzip.open(bpe_path or clip_bpe_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    n_merges = 49152 - 256 - 2
    merges = [tuple(line.split()) for line in lines[1:1 + n_merges]]
    if len(merges) != n_merges or any(len(m) != 2 for m in merges):
        raise ValueError(f"bpe_path: expected {n_merges} merge lines of two symbols, got a malformed file")
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + EOW for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"bpe_path: expected {CLIP_VOCAB_SIZE} distinct tokens, got {len(vocab)}")
    return vocab, merges


def clip_clean(text: str) -> str:
    """CLIP's text cleaning before BPE: ``ftfy.fix_text`` (when ftfy is installed), HTML entities
    unescaped twice, surrounding whitespace stripped, inner runs collapsed to one space, lower case."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class CleanTextTokenizer:
    """A transformers tokenizer with CLIP's text cleaning (:func:`clip_clean`) applied to every
    input first.  ``__call__`` / ``encode`` clean; everything else (ids, ``len``, decoding,
    special tokens) is the wrapped tokenizer's.  ``save_pretrained`` records the cleaning so
    :func:`load_tokenizer` puts it back."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @staticmethod
    def _clean(text):
        if isinstance(text, str):
            return clip_clean(text)
        if isinstance(text, (list, tuple)):
            return [clip_clean(t) if isinstance(t, str) else t for t in text]
        return text

    def __call__(self, text, *args, **kwargs):
        """Tokenise like the wrapped tokenizer, after CLIP's cleaning.  Special-token strings in
        the text ("<|endoftext|>" in a web caption) are plain text, as in CLIP: they never end a
        caption early."""
        kwargs.setdefault("split_special_tokens", True)
        return self.tokenizer(self._clean(text), *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        """Token ids of one text, after CLIP's cleaning (special-token strings are plain text)."""
        kwargs.setdefault("split_special_tokens", True)
        return self.tokenizer.encode(self._clean(text), *args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name):
        if name == "tokenizer":   # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def save_pretrained(self, path: str):
        """Write the wrapped tokenizer and a marker naming the cleaning."""
        out = self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, MARKER_FILE), "w") as fh:
            json.dump({"clean": "clip"}, fh)
        return out


@functools.lru_cache(maxsize=4)
def _cached_clip(model_max_length: int, bpe_path: str):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_merges(bpe_path)
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)
    if (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != \
            (CLIP_VOCAB_SIZE, CLIP_BOS_ID, CLIP_EOS_ID, CLIP_EOS_ID):
        raise RuntimeError(f"CLIP tokenizer: unexpected layout (size {len(tok)}, bos {tok.bos_token_id}, "
                           f"eos {tok.eos_token_id}, pad {tok.pad_token_id})")
    return CleanTextTokenizer(tok)


def clip_tokenizer(model_max_length: int = CLIP_CONTEXT, bpe_path: str | None = None) -> CleanTextTokenizer:
    """CLIP's exact tokenizer, built offline from open_clip_torch's BPE file (see the module
    docstring): 49408 ids, BOS 49406, EOS 49407 (also padding), ``model_max_length`` tokens
    (CLIP: 77) with truncation keeping the EOS.  Cached per (length, file)."""
    return _cached_clip(int(model_max_length), bpe_path or clip_bpe_path())


# ------------------------------------------------------------------------------- loading / saving

def load_tokenizer(name_or_path: str = "shapesworld", model_max_length: int | None = None):
    """``"shapesworld"`` -> :func:`shapesworld_tokenizer`; ``"clip"`` -> :func:`clip_tokenizer`; a
    local folder -> ``AutoTokenizer`` (wrapped in :class:`CleanTextTokenizer` when the folder's
    marker asks for CLIP's cleaning).

    Never downloads (``local_files_only=True``); a missing folder is a clear error.
    """
    if name_or_path == "shapesworld":
        return shapesworld_tokenizer(model_max_length or 77)
    if name_or_path == "clip":
        return clip_tokenizer(model_max_length or CLIP_CONTEXT)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"name_or_path: {name_or_path!r} is neither 'shapesworld', 'clip' nor a local "
                                "tokenizer folder (downloads are disabled; save the tokenizer with save_pretrained "
                                "first)")
    from transformers import AutoTokenizer

    kw = {} if model_max_length is None else {"model_max_length": model_max_length}
    tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, **kw)
    marker = os.path.join(name_or_path, MARKER_FILE)
    if os.path.isfile(marker):
        with open(marker) as fh:
            if json.load(fh).get("clean") == "clip":
                tok = CleanTextTokenizer(tok)
    return tok


def save_tokenizer(tokenizer, path: str) -> str:
    """Write ``tokenizer`` to folder ``path`` (``save_pretrained``) so :func:`load_tokenizer` reloads it."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(path)
    return path


def model_tokenizer(model_dir: str, model_max_length: int | None = None):
    """The tokenizer a model folder carries (``<model_dir>/tokenizer``), or None when it has none
    (folders written before tokenizers travelled with the model)."""
    d = os.path.join(str(model_dir), TOKENIZER_SUBDIR)
    return load_tokenizer(d, model_max_length) if os.path.isdir(d) else None
