"""The benchmark pipeline for real data (propose -> review -> export -> eval) on a ShapesWorld
catalogue whose item ids are known, so every proposal can be checked.  The page itself is
driven by a real browser in test_review_browser.py; here the review server's logic is used
directly.  Tiny sizes: 61 views of 32 px, an untrained 16-d model."""
import itertools
import json
import os
import shutil
import tarfile

import pytest
from curation_fixtures import HOSTILE, HOSTILE_KEY, ITEMS, OFFSET, make_catalogue, make_model, metas

import solar
from solar import benchmark as bm
from solar.curation import (CatalogueError, ReviewApp, VerdictError, cohen_kappa, export_benchmark, load_proposal,
                            merge_verdicts, propose, read_verdicts)
from solar.curation.catalogue import caption_words
from solar.data import shapesworld as sw

N_TRIPLETS, NEG = 8, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    cat = make_catalogue(str(root / "catalogue"))
    model = make_model(str(root))
    prop = str(root / "proposal")
    spec = propose(cat, model, prop, triplets=N_TRIPLETS, negatives=NEG, seed=1)
    return {"root": root, "catalogue": cat, "cat_dir": str(root / "catalogue"), "model": model, "proposal": prop,
            "spec": spec}


def _jaccard(a, b):
    a, b = caption_words(a), caption_words(b)
    return len(a & b) / len(a | b)


def test_proposal_pairs_and_mined_negatives_are_right(world):
    spec, prop = world["spec"], load_proposal(world["proposal"])
    cat = metas(world["cat_dir"])
    caps = {}
    for n in sorted(os.listdir(world["cat_dir"])):
        if n.endswith(".tar"):
            with tarfile.open(os.path.join(world["cat_dir"], n)) as tar:
                caps.update({m.name[:-4]: tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")})
    trip_items = {t["item_id"] for t in spec["triplets"]}
    assert len(spec["triplets"]) == N_TRIPLETS and len(trip_items) == N_TRIPLETS
    single = OFFSET + ITEMS          # the one item with one view
    assert single not in trip_items
    for t in spec["triplets"]:
        mq, mp = cat[t["query"]], cat[t["positive"]]
        assert mq["item_id"] == mp["item_id"] == t["item_id"], "the positive must be the same item"
        assert (mq["shown"], mq["described"]) != (mp["shown"], mp["described"]), "another information split"
        # the pair whose captions overlap least among the item's three views
        views = [k for k, m in cat.items() if m["item_id"] == t["item_id"]]
        best = min(_jaccard(caps[a], caps[b]) for a, b in itertools.combinations(views, 2))
        assert t["caption_overlap"] == pytest.approx(best, abs=1e-4)
        assert _jaccard(caps[t["query"]], caps[t["positive"]]) == pytest.approx(best)
        negs = [c["item_id"] for c in t["candidates"]]
        assert len(negs) == NEG == len(set(negs)), "one candidate per item"
        assert not set(negs) & trip_items, "hard negatives are other items, never triplet items"
        assert [cat[c["key"]]["item_id"] for c in t["candidates"]] == negs
        assert [c["score"] for c in t["candidates"]] == sorted((c["score"] for c in t["candidates"]), reverse=True)
    # the scores are the model's, and the candidates are the nearest views outside the triplets
    t = spec["triplets"][0]
    others = [k for k, m in cat.items() if m["item_id"] not in trip_items and k in caps]
    from PIL import Image
    import io
    ims = [Image.open(io.BytesIO(prop.store.image(k)[0])) for k in [t["query"]]]
    q = solar.encode(ims, [prop.store.caption(t["query"])], model=world["model"])
    cand_keys = [c["key"] for c in t["candidates"]]
    cand_emb = solar.encode([Image.open(io.BytesIO(prop.store.image(k)[0])) for k in cand_keys],
                            [prop.store.caption(k) for k in cand_keys], model=world["model"])
    assert (q @ cand_emb.T)[0].tolist() == pytest.approx([c["score"] for c in t["candidates"]], abs=1e-4)
    assert set(spec["pool"]) <= set(prop.store.keys())
    pool_items = [cat[k]["item_id"] for k in spec["pool"]]
    assert len(pool_items) == len(set(pool_items)) == ITEMS + 1 - N_TRIPLETS   # every other item, one view each
    assert not set(pool_items) & trip_items
    assert set(others) >= set(spec["pool"])
    with open(os.path.join(world["proposal"], "items.txt")) as f:
        listed = {int(x) for x in f.read().split()}
    assert listed == trip_items | set(pool_items) | {c["item_id"] for t in spec["triplets"] for c in t["candidates"]}


def test_candidates_are_the_nearest_other_items(world):
    """Brute force over every view outside the triplets: the candidates are the best view of the best items."""
    from PIL import Image
    import io
    spec = world["spec"]
    cat = metas(world["cat_dir"])
    trip_items = {t["item_id"] for t in spec["triplets"]}
    keys, ims, caps = [], [], []
    for n in sorted(os.listdir(world["cat_dir"])):
        if n.endswith(".tar"):
            with tarfile.open(os.path.join(world["cat_dir"], n)) as tar:
                files = {m.name: tar.extractfile(m).read() for m in tar}
            for name, data in files.items():
                k = name[:-4]
                if name.endswith(".png") and cat[k]["item_id"] not in trip_items:
                    keys.append(k)
                    ims.append(Image.open(io.BytesIO(data)))
                    caps.append(files[k + ".txt"].decode())
    emb = solar.encode(ims, caps, model=world["model"])
    prop = load_proposal(world["proposal"])
    for t in spec["triplets"][:3]:
        q = solar.encode([Image.open(io.BytesIO(prop.store.image(t["query"])[0]))], [prop.store.caption(t["query"])],
                         model=world["model"])
        s = (q @ emb.T)[0]
        best = {}
        for k, v in zip(keys, s.tolist()):
            i = cat[k]["item_id"]
            best[i] = max(best.get(i, -9), v)
        top = sorted(best.values(), reverse=True)[:NEG]
        assert [c["score"] for c in t["candidates"]] == pytest.approx(top, abs=1e-4)


def test_propose_is_deterministic_for_a_seed(world, tmp_path):
    again = propose(world["catalogue"], world["model"], str(tmp_path / "a"), triplets=N_TRIPLETS, negatives=NEG,
                    seed=1)
    with open(os.path.join(world["proposal"], "proposal.json"), "rb") as f, \
            open(tmp_path / "a" / "proposal.json", "rb") as g:
        assert f.read() == g.read()
    assert again["samples"]["sha256"] == world["spec"]["samples"]["sha256"]
    other = propose(world["catalogue"], world["model"], str(tmp_path / "b"), triplets=N_TRIPLETS, negatives=NEG,
                    seed=2)
    assert [t["item_id"] for t in other["triplets"]] != [t["item_id"] for t in world["spec"]["triplets"]]


def test_propose_refuses_bad_catalogues(world, tmp_path):
    # shards whose json carries no item id
    bad = tmp_path / "noid"
    bad.mkdir()
    sw.write_samples(str(bad / "s.tar"), [(k, png, cap, {"view": 0}) for k, png, cap, _ in
                                          (sw.make_pair(0, i, 0, 32) for i in range(4))])
    with pytest.raises(CatalogueError, match="has no 'item_id' in its json.*4 sample"):
        propose(str(bad / "s.tar"), world["model"], str(tmp_path / "p1"))
    assert not (tmp_path / "p1").exists(), "nothing written on bad input"
    # items with one view only
    one = sw.write_shards(str(tmp_path / "one"), 12, seed=0, workers=1, image_size=32, progress=False)
    msg = "need 2 items with two or more distinct views; the catalogue has 0 \\(12 item.s. with one view"
    with pytest.raises(CatalogueError, match=msg):
        propose(os.path.join(str(tmp_path / "one"), one["pattern"]), world["model"], str(tmp_path / "p2"), triplets=2)
    # more triplets than items with two views; and the CLI: one line, exit status 2
    rc = bm.main(["propose", "--shards", world["catalogue"], "--model", world["model"], "--out",
                  str(tmp_path / "p3"), "--triplets", "50", "--no-progress"])
    assert rc == 2
    with pytest.raises(ValueError, match="negatives: expected an int >= 1, got 0"):
        propose(world["catalogue"], world["model"], str(tmp_path / "p4"), negatives=0)


def test_propose_check_train_finds_overlap(world, tmp_path):
    train = tmp_path / "train"
    sw.write_shards(str(train), 30, seed=0, workers=1, image_size=32, item_offset=OFFSET + 5, progress=False)
    with pytest.raises(ValueError, match="benchmark items appear in training data: .* shared item id"):
        propose(world["catalogue"], world["model"], str(tmp_path / "p"), triplets=2, check_train=str(train))
    clean = tmp_path / "clean"
    sw.write_shards(str(clean), 30, seed=0, workers=1, image_size=32, item_offset=0, progress=False)
    propose(world["catalogue"], world["model"], str(tmp_path / "ok"), triplets=2, negatives=2,
            check_train=str(clean))


def _review(world, path, reviewer, plan):
    """Decide with the review server's logic: plan[i] = ('accept', candidate) | ('reject',) | ('flag',)."""
    app = ReviewApp(world["proposal"], path, reviewer)
    for i, d in plan.items():
        t = app.triplet(i)
        app.decide({"triplet": t["id"], "verdict": d[0], "candidate": d[1] if len(d) > 1 else None})
    return app


def test_verdict_file_resumes_and_refuses_another_proposal(world, tmp_path):
    path = str(tmp_path / "v.jsonl")
    app = _review(world, path, "alice", {0: ("accept", 1), 1: ("reject",), 2: ("flag",)})
    assert app.state()["next"] == 3 and app.state()["counts"] == {"accept": 1, "reject": 1, "flag": 1, "decided": 3}
    # a crash mid-write leaves a cut-off last line: dropped on reopen, the rest kept
    with open(path, "ab") as f:
        f.write(b'{"type":"verdict","triplet":"t00003","verd')
    app2 = ReviewApp(world["proposal"], path, "alice")
    assert app2.state()["next"] == 3 and app2.state()["counts"]["decided"] == 3
    assert app2.triplet(0)["decision"]["negative"] == world["spec"]["triplets"][0]["candidates"][1]["key"]
    app2.decide({"triplet": "t00003", "verdict": "reject"})
    _, latest = read_verdicts(path)
    assert len(latest) == 4
    # changing one's mind appends; the latest line wins
    app2.decide({"triplet": "t00001", "verdict": "accept", "candidate": 0})
    assert read_verdicts(path)[1]["t00001"]["verdict"] == "accept"
    with pytest.raises(ValueError, match="candidate: expected an int in \\[0, 3\\)"):
        app2.decide({"triplet": "t00002", "verdict": "accept", "candidate": 7})
    with pytest.raises(VerdictError, match="is the file of reviewer 'alice', not of 'bob'"):
        ReviewApp(world["proposal"], path, "bob")
    # the same verdict file against another proposal (another seed): refused, naming both hashes
    other = str(tmp_path / "other")
    propose(world["catalogue"], world["model"], other, triplets=4, negatives=2, seed=5)
    with pytest.raises(VerdictError, match="belongs to proposal .*not to this proposal"):
        ReviewApp(other, path, "alice")
    with pytest.raises(VerdictError, match="belongs to proposal"):
        export_benchmark(other, path, str(tmp_path / "b"))


def test_cohen_kappa():
    a = ["accept", "accept", "reject", "reject"]
    b = ["accept", "reject", "reject", "reject"]
    assert cohen_kappa(a, b) == pytest.approx(0.5)      # p_o 3/4, p_e 1/2
    assert cohen_kappa(a, a) == 1.0
    assert cohen_kappa(["accept", "reject"], ["reject", "accept"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equally long"):
        cohen_kappa(a, b[:3])


def test_merge_two_reviewers_and_export_consensus(world, tmp_path):
    a = str(tmp_path / "alice.jsonl")
    b = str(tmp_path / "bob.jsonl")
    _review(world, a, "alice", {0: ("accept", 0), 1: ("accept", 1), 2: ("reject",), 3: ("accept", 0), 4: ("flag",)})
    _review(world, b, "bob", {0: ("accept", 0), 1: ("accept", 2), 2: ("reject",), 3: ("reject",), 5: ("accept", 0)})
    m = merge_verdicts([a, b])
    assert m.both_decided == 4                       # t0..t3 decided by both
    assert m.agreement == pytest.approx(2 / 4)       # t0 same accept, t2 both reject
    assert m.negative_disagreements == 1
    assert m.kappa == pytest.approx(cohen_kappa(["accept", "accept", "reject", "accept"],
                                                ["accept", "accept", "reject", "reject"]))
    assert [t for t, d in m.decisions.items() if d["verdict"] == "accept"] == ["t00000"]
    assert bm.main(["review", world["proposal"], "--merge", a, b, "--out", str(tmp_path / "m.json")]) == 0
    spec = export_benchmark(world["proposal"], [a, b], str(tmp_path / "bench"))
    assert [t["proposal_id"] for t in spec["triplets"]] == ["t00000"]
    assert spec["triplets"][0]["verified_by"] == ["alice", "bob"]
    assert spec["verification"]["kappa"] == pytest.approx(m.kappa, abs=1e-6)


def test_export_then_eval(world, tmp_path, capsys):
    v = str(tmp_path / "alice.jsonl")
    plan = {i: ("accept", i % NEG) for i in range(N_TRIPLETS)}
    plan[2] = ("reject",)
    plan[5] = ("flag",)
    _review(world, v, "alice", plan)
    out = str(tmp_path / "bench")
    assert bm.main(["export", world["proposal"], "--verdicts", v, "--out", out, "--shard-size", "10"]) == 0
    b = bm.load_benchmark(out, verify=True)
    spec = world["spec"]
    assert len(b.triplets) == N_TRIPLETS - 2
    got = metas(out)
    assert b.num_pairs == len(got) == len(set(spec["pool"]) | {k for t in b.triplets for k in
                                                                 (t["query"], t["positive"], t["negative"])})
    for t in b.triplets:
        src = next(s for s in spec["triplets"] if s["id"] == t["proposal_id"])
        i = int(t["proposal_id"][1:])
        assert t["negative"] == src["candidates"][i % NEG]["key"]
        assert got[t["query"]]["item_id"] == got[t["positive"]]["item_id"] != got[t["negative"]]["item_id"]
        assert t["verified_by"] == ["alice"]
    assert b.spec["verification"]["verdict_files"][0]["reviewer"] == "alice"
    assert b.spec["verification"]["verdict_files"][0]["accept"] == N_TRIPLETS - 2
    # the caption with HTML in it is copied byte for byte
    with tarfile.open(os.path.join(world["proposal"], "samples.tar")) as tar:
        assert tar.extractfile(HOSTILE_KEY + ".txt").read().decode().endswith(" " + HOSTILE)
    # python -m solar.eval reads it unchanged
    from solar.eval import main as eval_main
    capsys.readouterr()
    assert eval_main(["--ckpt", f"tiny={world['model']}", "--bench", out, "--no-progress",
                      "--out", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert f"{N_TRIPLETS - 2} triplets, {b.num_pairs} pairs searched" in table
    with open(tmp_path / "r.json") as f:
        res = json.load(f)
    assert 0 <= res["models"]["tiny"]["fp32"]["Avg"] <= 100
    # the items are the catalogue's: training data from the catalogue overlaps, other data does not
    with pytest.raises(ValueError, match="shared item id"):
        bm.check_no_overlap(world["cat_dir"], out)
    clean = tmp_path / "train"
    sw.write_shards(str(clean), 20, seed=0, workers=1, image_size=32, progress=False)
    assert bm.check_no_overlap(str(clean), out).ok
    with pytest.raises(ValueError, match="shared item id"):     # export --check-train: refused, no spec left
        export_benchmark(world["proposal"], v, str(tmp_path / "b2"), check_train=world["cat_dir"])
    assert not os.path.exists(tmp_path / "b2" / "triplets.json")
    export_benchmark(world["proposal"], v, str(tmp_path / "b3"), check_train=str(clean))
    # nothing accepted: a clear error, nothing written
    none = str(tmp_path / "none.jsonl")
    _review(world, none, "carol", {0: ("reject",)})
    with pytest.raises(ValueError, match="0 triplet.s. accepted, expected at least 1"):
        export_benchmark(world["proposal"], none, str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "empty" / "triplets.json")


def test_damaged_proposal_is_refused(world, tmp_path):
    d = str(tmp_path / "p")
    shutil.copytree(world["proposal"], d)
    with open(os.path.join(d, "samples.tar"), "r+b") as f:
        f.seek(700)
        f.write(b"XXXX")
    with pytest.raises(ValueError, match="samples.tar does not match"):
        load_proposal(d)
    with pytest.raises(FileNotFoundError, match="no proposal at"):
        load_proposal(str(tmp_path / "nothing"))


def test_string_item_ids_and_id_field(world, tmp_path):
    """Real catalogues name items with strings (SKUs) under their own json field."""
    src = metas(world["cat_dir"])
    out = tmp_path / "sku"
    out.mkdir()
    samples = []
    for n in sorted(os.listdir(world["cat_dir"])):
        if n.endswith(".tar"):
            with tarfile.open(os.path.join(world["cat_dir"], n)) as tar:
                files = {m.name: tar.extractfile(m).read() for m in tar}
            for name in files:
                if name.endswith(".png"):
                    k = name[:-4]
                    meta = {"sku": f"SKU-{src[k]['item_id']}"}
                    samples.append((k, files[name], files[k + ".txt"].decode(), meta))
    sw.write_samples(str(out / "s.tar"), samples)
    spec = propose(str(out / "s.tar"), world["model"], str(tmp_path / "p"), triplets=3, negatives=2,
                   id_field="sku")
    for t in spec["triplets"]:
        assert t["item_id"].startswith("SKU-") and all(c["item_id"] != t["item_id"] for c in t["candidates"])
    with pytest.raises(CatalogueError, match="has no 'item_id'"):
        propose(str(out / "s.tar"), world["model"], str(tmp_path / "q"), triplets=3)
