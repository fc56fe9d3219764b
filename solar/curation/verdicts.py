"""Verdict files: one reviewer's decisions on a proposal, saved as they are made; merging two.

A verdict file is JSON lines.  The first line is a header naming the proposal it belongs to
(the sha256 of its proposal.json) and the reviewer; every further line is one decision::

    {"type": "header", "format": "solar-review-verdicts", "version": 1, "proposal_sha256": "9f86...",
     "reviewer": "alice", "created": "2026-11-30T21:40:00Z"}
    {"type": "verdict", "triplet": "t00003", "verdict": "accept", "negative": "0000000042_001",
     "candidate": 1, "reviewer": "alice", "time": "2026-11-30T21:41:07Z"}

``verdict`` is ``accept`` (with the chosen hard negative), ``reject`` (the triplet is not
usable: the positive is not the same thing, or no candidate is a fair negative) or ``flag``
(unsure: to be looked at again; not exported).  A later line for the same triplet replaces
an earlier one (changing one's mind is appending, never rewriting).  Each decision is one
``write`` of a whole line followed by ``flush`` and ``fsync`` before the page is told it is
saved, so a crash or a closed tab loses at most the decision being made; a line cut off by a
crash mid-write (the last line, without its newline) is dropped when the file is opened
again, and only there.

:func:`merge_verdicts` combines reviewers: a triplet is accepted when every reviewer
accepted it with the same negative; Cohen's kappa over the three-way verdict measures how
far the reviewers agree beyond chance.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

__all__ = ["VERDICTS_FORMAT", "VERDICTS", "VerdictError", "VerdictFile", "read_verdicts", "cohen_kappa",
           "merge_verdicts", "MergeResult"]

VERDICTS_FORMAT = "solar-review-verdicts"
VERDICTS_VERSION = 1
VERDICTS = ("accept", "reject", "flag")


class VerdictError(ValueError):
    """A verdict file that is malformed, or belongs to another proposal."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _parse(path: str):
    """(header, [decision dicts], byte length of the whole lines); a torn last line is not counted."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    complete = len(raw) if raw.endswith(b"\n") or not raw else len(raw) - len(lines[-1])
    body = raw[:complete].split(b"\n")[:-1] if complete else []
    if not body:
        raise VerdictError(f"verdicts: {path} has no header line (an empty or cut-off file)")
    recs = []
    for n, line in enumerate(body, 1):
        try:
            recs.append(json.loads(line))
        except (ValueError, UnicodeDecodeError) as e:
            raise VerdictError(f"verdicts: {path}: line {n} is not json ({e})") from None
    head = recs[0]
    if not isinstance(head, dict) or head.get("type") != "header" or head.get("format") != VERDICTS_FORMAT:
        raise VerdictError(f"verdicts: {path}: expected a {VERDICTS_FORMAT!r} header on line 1, got {str(head)[:120]}")
    if head.get("version") != VERDICTS_VERSION:
        raise VerdictError(f"verdicts: {path}: version: expected {VERDICTS_VERSION}, got {head.get('version')!r}")
    for n, r in enumerate(recs[1:], 2):
        if not isinstance(r, dict) or r.get("type") != "verdict" or r.get("verdict") not in VERDICTS \
                or not isinstance(r.get("triplet"), str):
            raise VerdictError(f"verdicts: {path}: line {n}: expected a verdict record (type 'verdict', "
                               f"verdict one of {VERDICTS}, triplet id), got {str(r)[:120]}")
        if r["verdict"] == "accept" and not isinstance(r.get("negative"), str):
            raise VerdictError(f"verdicts: {path}: line {n}: an accept must name its negative, got {str(r)[:120]}")
    return head, recs[1:], complete


def read_verdicts(path: str, proposal_sha256: str | None = None) -> tuple[dict, dict]:
    """(header, {triplet id: latest decision}) of a verdict file.

    With ``proposal_sha256``, a file written for another proposal is a VerdictError naming
    both hashes (verdicts are by triplet id, and ids repeat across proposals)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verdicts: no such file {path!r}")
    head, recs, _ = _parse(path)
    if proposal_sha256 is not None and head.get("proposal_sha256") != proposal_sha256:
        raise VerdictError(f"verdicts: {path} belongs to proposal {str(head.get('proposal_sha256'))[:16]}..., not to "
                           f"this proposal {proposal_sha256[:16]}... (review it with a new verdict file)")
    latest = {}
    for r in recs:
        latest[r["triplet"]] = r
    return head, latest


class VerdictFile:
    """An open verdict file for one reviewer of one proposal: read what was decided, append decisions.

    Opening an existing file checks its header (same proposal; same reviewer unless
    ``reviewer`` is None) and drops a cut-off last line; a new file gets its header at once
    (fsync'd).  :meth:`record` is thread-safe (the review server answers requests in threads)."""

    def __init__(self, path: str, proposal_sha256: str, reviewer: str | None):
        self.path = path
        self._lock = threading.Lock()
        if os.path.exists(path) and os.path.getsize(path) > 0:
            head, recs, complete = _parse(path)
            if head.get("proposal_sha256") != proposal_sha256:
                raise VerdictError(f"verdicts: {path} belongs to proposal {str(head.get('proposal_sha256'))[:16]}..., "
                                   f"not to this proposal {proposal_sha256[:16]}... (use another verdict file)")
            if reviewer is not None and head.get("reviewer") != reviewer:
                raise VerdictError(f"verdicts: {path} is the file of reviewer {head.get('reviewer')!r}, "
                                   f"not of {reviewer!r} "
                                   f"(each reviewer keeps their own file; merge them with review --merge)")
            if complete < os.path.getsize(path):   # a line cut off by a crash: drop it before appending
                with open(path, "r+b") as f:
                    f.truncate(complete)
                    os.fsync(f.fileno())
            self.header = head
            self.latest = {}
            for r in recs:
                self.latest[r["triplet"]] = r
        else:
            if not isinstance(reviewer, str) or not reviewer.strip():
                raise ValueError(f"reviewer: expected a non-empty name for a new verdict file, got {reviewer!r}")
            self.header = {"type": "header", "format": VERDICTS_FORMAT, "version": VERDICTS_VERSION,
                           "proposal_sha256": proposal_sha256, "reviewer": reviewer.strip(), "created": _now()}
            self.latest = {}
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            self._append(self.header)
        self.reviewer = self.header["reviewer"]

    def _append(self, rec: dict) -> None:
        line = (json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def record(self, triplet: str, verdict: str, negative: str | None = None, candidate: int | None = None) -> dict:
        """Append one decision (durably: fsync'd before returning) and return it."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict: expected one of {VERDICTS}, got {verdict!r}")
        if verdict == "accept" and not isinstance(negative, str):
            raise ValueError(f"negative: an accept needs the chosen negative's key, got {negative!r}")
        rec = {"type": "verdict", "triplet": triplet, "verdict": verdict, "reviewer": self.reviewer, "time": _now()}
        if verdict == "accept":
            rec["negative"], rec["candidate"] = negative, candidate
        with self._lock:
            self._append(rec)
            self.latest[triplet] = rec
        return rec

    def counts(self) -> dict:
        """{accept, reject, flag, decided}: the latest decisions counted."""
        c = {v: 0 for v in VERDICTS}
        for r in self.latest.values():
            c[r["verdict"]] += 1
        c["decided"] = len(self.latest)
        return c


def cohen_kappa(a, b, labels=VERDICTS) -> float:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e).

    p_o is the observed share of agreement, p_e the agreement expected by chance from each
    rater's label frequencies.  1 = perfect agreement, 0 = chance.  When both raters use one
    and the same label throughout (p_e = 1) the result is 1.0 if they agree everywhere."""
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"a/b: expected two equally long non-empty label lists, got {len(a)} and {len(b)}")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p_e = sum((a.count(lab) / n) * (b.count(lab) / n) for lab in set(labels) | set(a) | set(b))
    if p_e >= 1.0:
        return 1.0 if p_o == 1.0 else 0.0
    return (p_o - p_e) / (1.0 - p_e)


@dataclass
class MergeResult:
    """Two or more reviewers' decisions combined (see :func:`merge_verdicts`)."""
    proposal_sha256: str
    reviewers: list
    decisions: dict          # triplet id -> {"verdict": accept|reject|disputed, "negative", "verified_by"}
    both_decided: int
    agreement: float         # share of triplets decided by all with the same verdict (and negative)
    kappa: float             # Cohen's kappa on the three-way verdict (two reviewers), None otherwise
    negative_disagreements: int

    def summary(self) -> str:
        acc = sum(d["verdict"] == "accept" for d in self.decisions.values())
        kap = "n/a" if self.kappa is None else f"{self.kappa:.3f}"
        return (f"{' + '.join(self.reviewers)}: {self.both_decided} triplet(s) decided by all, agreement "
                f"{100 * self.agreement:.1f}%, Cohen's kappa {kap}; {acc} accepted by all with the same negative, "
                f"{self.negative_disagreements} accepted by all with different negatives")


def merge_verdicts(paths, proposal_sha256: str | None = None) -> MergeResult:
    """Combine verdict files of the same proposal (VerdictError if their proposals differ).

    Only triplets every file decided are merged: accepted when all accepted with the same
    negative, rejected when all rejected, else ``disputed`` (not exported).  Agreement and
    Cohen's kappa (for two files) are computed on those triplets over the verdict
    (accept / reject / flag); the chosen negative is compared separately."""
    paths = list(paths)
    if len(paths) < 2:
        raise ValueError(f"paths: expected at least two verdict files to merge, got {len(paths)}")
    heads, latests = [], []
    for p in paths:
        h, latest = read_verdicts(p, proposal_sha256)
        if heads and h.get("proposal_sha256") != heads[0].get("proposal_sha256"):
            raise VerdictError(f"verdicts: {p} belongs to proposal {str(h.get('proposal_sha256'))[:16]}..., "
                               f"{paths[0]} to {str(heads[0].get('proposal_sha256'))[:16]}...: they cannot be merged")
        heads.append(h)
        latests.append(latest)
    reviewers = [h.get("reviewer") for h in heads]
    if len(set(reviewers)) != len(reviewers):
        raise VerdictError(f"verdicts: the files are by reviewers {reviewers}; merging needs different reviewers")
    common = sorted(set.intersection(*(set(x) for x in latests)))
    decisions, agree, neg_dis = {}, 0, 0
    for t in common:
        rs = [x[t] for x in latests]
        vs = {r["verdict"] for r in rs}
        negs = {r.get("negative") for r in rs}
        if vs == {"accept"} and len(negs) == 1:
            decisions[t] = {"verdict": "accept", "negative": rs[0]["negative"], "verified_by": reviewers}
        elif vs == {"reject"}:
            decisions[t] = {"verdict": "reject", "verified_by": reviewers}
        else:
            decisions[t] = {"verdict": "disputed", "verdicts": dict(zip(reviewers, (r["verdict"] for r in rs)))}
        neg_dis += vs == {"accept"} and len(negs) > 1
        agree += len(vs) == 1 and (vs != {"accept"} or len(negs) == 1)
    kappa = None
    if len(paths) == 2 and common:
        kappa = cohen_kappa([latests[0][t]["verdict"] for t in common], [latests[1][t]["verdict"] for t in common])
    return MergeResult(heads[0].get("proposal_sha256"), reviewers, decisions, len(common),
                       agree / len(common) if common else 0.0, kappa, neg_dis)
