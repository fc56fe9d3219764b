"""The review page in a real headless browser (Debian's chromium + chromedriver, driven by selenium),
offline: decide by keys, reload mid-review and restart the server and continue where it
stopped, captions with HTML in them shown as text; then export what was decided.

Skipped (with the reason) where chromium, chromedriver or selenium is missing; `.ci/run`
installs them.  SOLAR_REVIEW_SCREENSHOT=PATH saves the page at a decision (docs/review.png)."""
import importlib.util
import json
import os
import shutil
import threading

import pytest
from curation_fixtures import HOSTILE, ITEMS, OFFSET, make_catalogue, make_model

from solar import benchmark as bm
from solar.curation import ReviewApp, export_benchmark, make_server, propose, read_verdicts
from solar.data.shapesworld import sample_key

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
_missing = [n for n, ok in (("chromium", CHROMIUM), ("chromedriver", DRIVER),
                            ("selenium", importlib.util.find_spec("selenium"))) if not ok]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"needs a headless browser: {', '.join(_missing)} not installed "
                                                       f"(apt-get install chromium chromium-driver; pip install "
                                                       f"selenium; .ci/run does both)")
N, NEG = 5, 3


@pytest.fixture(scope="module")
def proposal(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    # HTML in the captions of views 0 and 1 of every item: every query / positive pair shows some
    hostile = {sample_key(OFFSET + i, v) for i in range(ITEMS) for v in (0, 1)}
    cat = make_catalogue(str(root / "catalogue"), hostile)
    model = make_model(str(root))
    out = str(root / "proposal")
    propose(cat, model, out, triplets=N, negatives=NEG, seed=4)
    return out


class _Server:
    def __init__(self, proposal, verdicts, reviewer):
        self.app = ReviewApp(proposal, verdicts, reviewer)
        self.srv = make_server(self.app, 0)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/"
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,760",
              "--disable-extensions", "--no-first-run", "--proxy-server=direct://", "--proxy-bypass-list=*"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _wait(d, index=None, state="ready", timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    def ok(drv):
        ds = drv.execute_script("return [document.body.dataset.state, document.body.dataset.index]")
        return ds[0] == state and (index is None or ds[1] == str(index))
    WebDriverWait(d, timeout, poll_frequency=0.1).until(ok)


def _key(d, k):
    from selenium.webdriver.common.by import By
    d.find_element(By.TAG_NAME, "body").send_keys(k)


def _text(d, css):
    return d.execute_script("return document.querySelector(arguments[0]).textContent", css)


def test_review_by_keys_resume_and_export(proposal, browser, tmp_path):
    verdicts = str(tmp_path / "alice.jsonl")
    srv = _Server(proposal, verdicts, "alice")
    trips = srv.app.proposal.triplets
    try:
        browser.get(srv.url)
        _wait(browser, 0)
        # data is text: the caption shows the markup literally, and nothing of it ran or was parsed
        caps = _text(browser, "#query .caption") + _text(browser, "#positive .caption")
        assert "<script>window.__pwned = 1</script>" in caps
        assert HOSTILE in caps
        assert browser.execute_script("return window.__pwned === undefined")
        assert browser.execute_script("return document.querySelectorAll('main script, .caption *').length") == 0
        assert _text(browser, "#negpos") == f"(candidate 1 of {NEG})"
        _key(browser, "a")                    # accept with the first candidate
        _wait(browser, 1)
        _key(browser, "n")                    # another negative, then accept
        assert _text(browser, "#negpos") == f"(candidate 2 of {NEG})"
        _key(browser, "a")
        _wait(browser, 2)
        _key(browser, "r")
        _wait(browser, 3)
        _, latest = read_verdicts(verdicts)
        assert {t: r["verdict"] for t, r in latest.items()} == {"t00000": "accept", "t00001": "accept",
                                                                "t00002": "reject"}
        assert latest["t00001"]["negative"] == trips[1]["candidates"][1]["key"]
        # the tab is reloaded: the page opens at the first undecided triplet with the counts
        browser.refresh()
        _wait(browser, 3)
        assert _text(browser, "#counts") == "3 decided: 2 accepted, 1 rejected, 0 flagged"
        _key(browser, "f")
        _wait(browser, 4)
    finally:
        srv.stop()
    # the server is killed and started again on the same verdict file: nothing is lost
    srv = _Server(proposal, verdicts, None)
    try:
        browser.get(srv.url)
        _wait(browser, 4)
        assert _text(browser, "#counts") == "4 decided: 2 accepted, 1 rejected, 1 flagged"
        _key(browser, "3")                    # candidate 3 by its number
        assert _text(browser, "#negpos") == f"(candidate 3 of {NEG})"
        shot = os.environ.get("SOLAR_REVIEW_SCREENSHOT")
        if shot:
            browser.save_screenshot(shot)
        _key(browser, "a")
        _wait(browser, state="done")
        assert "All 5 triplets decided" in _text(browser, "#done")
        _key(browser, "ArrowLeft")            # revisit the last one: its decision is shown
    finally:
        srv.stop()
    _, latest = read_verdicts(verdicts)
    assert len(latest) == N and latest["t00003"]["verdict"] == "flag"
    assert latest["t00004"]["negative"] == trips[4]["candidates"][2]["key"]
    with open(verdicts) as f:
        lines = [json.loads(x) for x in f]
    assert lines[0]["type"] == "header" and len(lines) == 1 + N
    # export what was decided in the browser, then it loads as a benchmark
    spec = export_benchmark(proposal, verdicts, str(tmp_path / "bench"))
    assert [t["proposal_id"] for t in spec["triplets"]] == ["t00000", "t00001", "t00004"]
    assert [t["negative"] for t in spec["triplets"]] == [trips[0]["candidates"][0]["key"],
                                                         trips[1]["candidates"][1]["key"],
                                                         trips[4]["candidates"][2]["key"]]
    bm.load_benchmark(str(tmp_path / "bench"), verify=True)


def test_server_refuses_foreign_hosts_and_bad_posts(proposal, tmp_path):
    import http.client
    srv = _Server(proposal, str(tmp_path / "v.jsonl"), "bob")
    try:
        port = srv.srv.server_address[1]
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/api/state", headers={"Host": "evil.example:80"})
        r = c.getresponse()
        assert r.status == 403 and b"refused" in r.read()
        c.request("POST", "/api/verdict", body=b'{"triplet": "t00000", "verdict": "maybe"}',
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 400 and b"verdict: expected one of" in r.read()
        c.request("GET", "/")
        r = c.getresponse()
        assert r.status == 200 and "default-src 'none'" in r.getheader("Content-Security-Policy")
        r.read()
    finally:
        srv.stop()
    assert read_verdicts(str(tmp_path / "v.jsonl"))[1] == {}
