"""Step 2 of the benchmark pipeline: review proposed triplets by hand in a browser.

A small server from the standard library (:mod:`http.server`, one thread per request),
bound to 127.0.0.1, serves one page (``review.html`` next to this module: inline CSS and
JavaScript, no external assets) and a JSON API over the proposal and the reviewer's
verdict file (:mod:`solar.curation.verdicts`)::

    GET  /                      the page
    GET  /api/state             reviewer, total, counts of decisions, first undecided triplet
    GET  /api/triplet?i=N       triplet N: query, positive, hard-negative candidates (keys,
                                captions, item ids, scores) and its current decision
    GET  /img?key=KEY           a view's image, read from the proposal's samples.tar
    POST /api/verdict           {"triplet", "verdict", "candidate"}: saved (fsync'd) before the reply

The page shows one triplet at a time; the keys are ``a`` accept with the shown negative,
``r`` reject, ``f`` flag, ``n`` / ``p`` or ``1``-``9`` show another candidate negative,
arrows move between triplets, ``u`` jumps to the next undecided one.  A decision is on
disk before the page moves on, so reloading the page, closing the tab or killing the
server loses nothing, and the page opens at the first undecided triplet.

The page puts data into the document only as text (``textContent``), and every reply
carries a Content-Security-Policy that allows no other origin; requests whose Host is not
the server's own loopback address are refused (a web page elsewhere cannot drive it).
"""
from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .propose import Proposal, load_proposal
from .verdicts import VERDICTS, VerdictFile

__all__ = ["ReviewApp", "make_server", "serve", "PAGE_PATH"]

PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "review.html")
_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ReviewApp:
    """The review logic behind the server: a proposal, one reviewer's verdict file, the page."""

    def __init__(self, proposal, verdicts_path: str, reviewer: str | None):
        self.proposal: Proposal = proposal if isinstance(proposal, Proposal) else load_proposal(proposal)
        self.verdicts = VerdictFile(verdicts_path, self.proposal.sha256, reviewer)
        self.ids = {t["id"]: i for i, t in enumerate(self.proposal.triplets)}
        stray = [t for t in self.verdicts.latest if t not in self.ids]
        if stray:
            raise ValueError(f"verdicts: {verdicts_path} decides triplet(s) {stray[:3]} that the proposal does "
                             f"not have")
        with open(PAGE_PATH, "rb") as f:
            self.page = f.read()

    def state(self) -> dict:
        """Reviewer, number of triplets, decision counts and the first undecided triplet (None: all decided)."""
        nxt = next((i for i, t in enumerate(self.proposal.triplets) if t["id"] not in self.verdicts.latest), None)
        return {"reviewer": self.verdicts.reviewer, "total": len(self.proposal.triplets),
                "counts": self.verdicts.counts(), "next": nxt, "proposal": self.proposal.sha256}

    def _view(self, rec: dict) -> dict:
        d = {"key": rec["key"], "item_id": rec.get("item_id"), "caption": self.proposal.store.caption(rec["key"])}
        if "score" in rec:
            d["score"] = rec["score"]
        return d

    def triplet(self, i: int) -> dict:
        """What the page shows for triplet ``i`` (IndexError when out of range)."""
        trips = self.proposal.triplets
        if not 0 <= i < len(trips):
            raise IndexError(f"i: expected 0 <= i < {len(trips)}, got {i}")
        t = trips[i]
        return {"index": i, "id": t["id"], "total": len(trips),
                "query": self._view({"key": t["query"], "item_id": t["item_id"]}),
                "positive": self._view({"key": t["positive"], "item_id": t["item_id"], "score": t["positive_score"]}),
                "candidates": [self._view(c) for c in t["candidates"]],
                "decision": self.verdicts.latest.get(t["id"])}

    def decide(self, body: dict) -> dict:
        """Record one decision from the page; the negative is looked up from the candidate index."""
        if not isinstance(body, dict):
            raise ValueError(f"body: expected a json object, got {type(body).__name__}")
        tid, verdict = body.get("triplet"), body.get("verdict")
        if tid not in self.ids:
            raise ValueError(f"triplet: unknown triplet id {tid!r}")
        if verdict not in VERDICTS:
            raise ValueError(f"verdict: expected one of {VERDICTS}, got {verdict!r}")
        negative = cand = None
        if verdict == "accept":
            cands = self.proposal.triplets[self.ids[tid]]["candidates"]
            cand = body.get("candidate")
            if isinstance(cand, bool) or not isinstance(cand, int) or not 0 <= cand < len(cands):
                raise ValueError(f"candidate: expected an int in [0, {len(cands)}), got {cand!r}")
            negative = cands[cand]["key"]
        rec = self.verdicts.record(tid, verdict, negative, cand)
        return {"saved": rec, "state": self.state()}


def _handler(app: ReviewApp, allowed_hosts: set):
    class Handler(BaseHTTPRequestHandler):
        server_version = "solar-review/1"

        def log_message(self, fmt, *args):   # quiet: the terminal shows the progress line only
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", _CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj) -> None:
            self._send(code, json.dumps(obj).encode("utf-8"), "application/json")

        def _host_ok(self) -> bool:
            if self.headers.get("Host", "") in allowed_hosts:
                return True
            self._json(403, {"error": f"host {self.headers.get('Host')!r} refused: open the page at the address "
                                      f"the server printed"})
            return False

        def do_GET(self):   # noqa: N802 - http.server's name
            if not self._host_ok():
                return
            url = urlsplit(self.path)
            q = parse_qs(url.query)
            try:
                if url.path in ("/", "/index.html"):
                    self._send(200, app.page, "text/html; charset=utf-8")
                elif url.path == "/api/state":
                    self._json(200, app.state())
                elif url.path == "/api/triplet":
                    self._json(200, app.triplet(int(q.get("i", ["-1"])[0])))
                elif url.path == "/img":
                    data, ctype = app.proposal.store.image(q.get("key", [""])[0])
                    self._send(200, data, ctype)
                else:
                    self._json(404, {"error": f"no such page {url.path!r}"})
            except (KeyError, IndexError, ValueError) as e:
                self._json(404, {"error": str(e)})

        def do_POST(self):   # noqa: N802
            if not self._host_ok():
                return
            if urlsplit(self.path).path != "/api/verdict":
                self._json(404, {"error": f"no such endpoint {self.path!r}"})
                return
            try:
                n = int(self.headers.get("Content-Length", "0"))
                if not 0 < n <= 65536:
                    raise ValueError(f"Content-Length: expected 1..65536 bytes, got {n}")
                body = json.loads(self.rfile.read(n))
                self._json(200, app.decide(body))
            except (ValueError, UnicodeDecodeError) as e:
                self._json(400, {"error": str(e)})
            except OSError as e:   # the verdict could not be written: the page must say NOT SAVED
                self._json(500, {"error": f"could not save the verdict: {e}"})

    return Handler


def make_server(app: ReviewApp, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A threading HTTP server for ``app`` on ``host:port`` (port 0: a free one); not started."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"host: the review server only binds to the loopback address, got {host!r}")
    srv = ThreadingHTTPServer((host, port), None)
    p = srv.server_address[1]
    srv.RequestHandlerClass = _handler(app, {f"127.0.0.1:{p}", f"localhost:{p}", f"[::1]:{p}"})
    srv.daemon_threads = True
    return srv


def serve(app: ReviewApp, port: int = 0, open_browser: bool = False) -> None:
    """Serve ``app`` until interrupted (Ctrl-C); prints the address to open."""
    srv = make_server(app, port)
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    s = app.state()
    print(f"reviewing {s['total']} triplet(s) as {s['reviewer']!r} ({s['counts']['decided']} decided), "
          f"verdicts in {app.verdicts.path}\nopen {url}  (Ctrl-C to stop; every decision is already saved)",
          flush=True)
    if open_browser:
        import webbrowser
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
        s = app.state()
        print(f"stopped: {s['counts']['decided']} of {s['total']} decided")
