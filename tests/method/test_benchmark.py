"""The sym-MM2MM benchmark: build, on-disk format, no overlap with training, metrics."""
import json
import os
import tarfile

import pytest
import torch

from solar import benchmark as bm
from solar.data import shapesworld as sw

N_TRIPLETS, POOL = 12, 30


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    bm.build_benchmark(out, seed=9, triplets=N_TRIPLETS, pool=POOL, shard_size=20, progress=False)
    return out


def _metas(shards):
    out = {}
    for p in shards:
        with tarfile.open(p) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    out[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    return out


# ---------------------------------------------------------------------------------------
# build / format
# ---------------------------------------------------------------------------------------
def test_build_format_and_triplet_semantics(bench_dir):
    b = bm.load_benchmark(bench_dir)
    assert bm.benchmark_exists(bench_dir)
    assert len(b.triplets) == N_TRIPLETS and b.num_pairs == 3 * N_TRIPLETS + POOL
    assert [os.path.basename(s) for s in b.shards] == [f"pool-{i:06d}.tar" for i in range(4)]  # 66 pairs / 20
    metas = _metas(b.shards)
    assert len(metas) == b.num_pairs
    keys = list(metas)
    q, p, n = b.indices(keys)
    assert q.shape == p.shape == n.shape == (N_TRIPLETS,)
    attrs_seen = set()
    for t, qi, pi, ni in zip(b.triplets, q, p, n):
        mq, mp, mn = metas[t["query"]], metas[t["positive"]], metas[t["negative"]]
        assert keys[qi] == t["query"] and keys[pi] == t["positive"] and keys[ni] == t["negative"]
        assert mq["item_id"] == mp["item_id"] != mn["item_id"]
        assert (mq["shown"], mq["described"]) != (mp["shown"], mp["described"]), "positive needs another split"
        assert mq["text_attrs"] == mn["text_attrs"]
        # X' equals X except one attribute of one object
        diffs = [(i, f) for i, (a, c) in enumerate(zip(mq["objects"], mn["objects"]))
                 for f in ("shape", "color", "size", "row", "col") if a[f] != c[f]]
        ch = t["change"]
        assert {i for i, _ in diffs} == {ch["object"]}
        assert {f for _, f in diffs} <= ({"row", "col"} if ch["attribute"] == "position" else {ch["attribute"]})
        attrs_seen.add(ch["attribute"])
        obs_q = set(mq["shown"]) | set(mq["described"])
        obs_n = set(mn["shown"]) | set(mn["described"])
        assert ch["object"] in obs_q and ch["object"] in obs_n, "the changed object must be observable"
    assert len(attrs_seen) >= 3
    pool_ids = {m["item_id"] for k, m in metas.items()} - {t["item_id"] for t in b.triplets} \
        - {t["negative_item_id"] for t in b.triplets}
    assert len(pool_ids) == POOL
    assert all(m["item_id"] >= sw.BENCHMARK_ITEM_BASE for m in metas.values())


def test_changed_object_is_observed_by_query_and_negative_over_many_triplets():
    """The one-attribute change must be visible: the changed object is among the query's
    observed objects and the negative view observes it too.  A builder that ignores either
    rule breaks it in only ~1% of the triplets, so check many (16 px renders are cheap)."""
    for t in range(1500):
        views, rec = bm._triplet(9, t, sw.BENCHMARK_ITEM_BASE, 16)
        mq, mn = views[0][3], views[2][3]
        obj = rec["change"]["object"]
        assert obj in set(mq["shown"]) | set(mq["described"]), f"triplet {t}: the query does not observe it"
        assert obj in set(mn["shown"]) | set(mn["described"]), f"triplet {t}: the negative does not observe it"


def test_build_is_deterministic(bench_dir, tmp_path):
    bm.build_benchmark(str(tmp_path), seed=9, triplets=N_TRIPLETS, pool=POOL, shard_size=20, progress=False)
    for name in ["triplets.json", "pool-000000.tar", "pool-000002.tar"]:
        with open(os.path.join(bench_dir, name), "rb") as a, open(tmp_path / name, "rb") as c:
            assert a.read() == c.read(), name


def test_load_errors(bench_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark"):
        bm.load_benchmark(str(tmp_path))
    spec = json.load(open(os.path.join(bench_dir, "triplets.json")))
    bad = dict(spec, format="other")
    (tmp_path / "triplets.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format"):
        bm.load_benchmark(str(tmp_path))
    (tmp_path / "triplets.json").write_text(json.dumps(spec))
    with pytest.raises(FileNotFoundError, match="pool-000000.tar"):
        bm.load_benchmark(str(tmp_path))
    assert not bm.benchmark_exists(str(tmp_path))
    b = bm.load_benchmark(bench_dir)
    with pytest.raises(KeyError, match="not embedded"):
        b.indices(["x", "y"])
    with pytest.raises(ValueError, match="duplicate"):
        b.indices(["x", "x"])
    with pytest.raises(ValueError, match="triplets"):
        bm.build_benchmark(str(tmp_path / "b"), triplets=0, progress=False)


def test_no_overlap_with_training(bench_dir, tmp_path):
    train = str(tmp_path / "train")
    sw.write_shards(train, 40, seed=9, shard_size=20, workers=1, progress=False)
    rep = bm.check_no_overlap(train, bench_dir)
    assert rep.ok and rep.train_samples == 40 and rep.benchmark_items == 2 * N_TRIPLETS + POOL
    assert rep.range_check.endswith("disjoint")
    # a training set that leaks one benchmark pair (same id and content) is caught
    b = bm.load_benchmark(bench_dir)
    leak_key = b.triplets[0]["positive"]
    with tarfile.open(b.shards[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    leak = [(leak_key, members[leak_key + ".png"], members[leak_key + ".txt"].decode(),
             json.loads(members[leak_key + ".json"]))]
    bad = str(tmp_path / "leak-000000.tar")
    sw.write_samples(bad, leak)
    with pytest.raises(ValueError, match="1 shared item id"):
        bm.check_no_overlap(bad, bench_dir)
    # same content under a training id is caught by the content check
    key, png, cap, meta = leak[0]
    meta = dict(meta, item_id=5)
    sw.write_samples(bad, [("0000000005_000", png, cap, meta)])
    rep = bm.check_no_overlap(bad, bench_dir, raise_on_overlap=False)
    assert rep.shared_item_ids == [] and rep.shared_contents == 1 and not rep.ok


# ---------------------------------------------------------------------------------------
# metrics on hand-made rankings
# ---------------------------------------------------------------------------------------
def test_recall_excludes_query():
    # collection of 20 items; query i's positive is 10 + i
    q = torch.tensor([0, 1, 2, 3])
    p = torch.tensor([10, 11, 12, 13])
    filler = list(range(14, 20)) + [4, 5, 6, 7, 8, 9]
    ranked = torch.tensor([
        [0, 10] + filler[:9],            # query first, positive second -> rank 1 after exclusion
        [5, 1, 6, 7, 8, 9, 14, 15, 16, 17, 11],  # positive 11th, query inside -> rank 10
        [5, 6, 7, 8, 9, 14, 15, 16, 17, 18, 12],  # positive 11th, query absent -> rank 11: miss
        [4, 5, 3, 13, 6, 7, 8, 9, 14, 15, 16],   # positive 4th, query 3rd -> rank 3
    ])
    r = bm.recall_at_k(ranked, q, p)
    assert r == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}
    # -1 padding (fewer results) never counts as a hit
    ranked2 = torch.full((1, 11), -1)
    ranked2[0, 0] = 0
    assert bm.recall_at_k(ranked2, q[:1], p[:1])["R@10"] == 0.0
    with pytest.raises(ValueError, match="max\\(ks\\) \\+ 1"):
        bm.recall_at_k(ranked[:, :10], q, p)
    with pytest.raises(ValueError, match="positive equals its query"):
        bm.recall_at_k(ranked, q, q)


def test_prec_mr_avg():
    assert bm.hard_negative_precision([0.9, 0.5, 0.3, 0.2], [0.1, 0.5, 0.4, 0.1]) == 50.0  # tie fails
    m = bm.summarize({"R@1": 40.0, "R@5": 70.0, "R@10": 100.0}, 80.0)
    assert m == {"R@1": 40.0, "R@5": 70.0, "R@10": 100.0, "mR": 70.0, "Prec": 80.0, "Avg": 75.0}
    with pytest.raises(ValueError, match="R@10"):
        bm.summarize({"R@1": 1.0, "R@5": 2.0}, 3.0)
    table = bm.format_table({"SOLAR": m})
    assert "R@1" in table.splitlines()[0] and "75.00" in table


def test_scores_and_search_agree():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    q = torch.arange(0, 10)
    p = torch.arange(10, 20)
    n = torch.arange(20, 30)
    emb[p] = torch.nn.functional.normalize(emb[q] + 0.3 * torch.randn(10, 8, generator=g), dim=1)
    s = emb @ emb.T
    ranked = s[q].topk(11, dim=1).indices
    ref = bm.metrics_from_search(ranked, q, p, s[q, p], s[q, n])
    got = bm.metrics_from_embeddings(emb, q, p, n, chunk=3)
    assert got == pytest.approx(ref)
    assert 0 < ref["R@1"] <= ref["R@5"] <= ref["R@10"] <= 100


def test_hand_made_scores_and_ties():
    # 6 items: triplet (0, 1, 2) and (3, 4, 5); scores hand-set
    S = torch.zeros(6, 6)
    S[0] = torch.tensor([9.0, 5.0, 6.0, 1.0, 0.0, 0.0])   # pos 2nd after excluding self; neg beats pos
    S[3] = torch.tensor([0.0, 0.0, 0.0, 9.0, 7.0, 2.0])   # pos first; pos beats neg
    m = bm.metrics_from_scores(lambda qb: S[qb], 6, [0, 3], [1, 4], [2, 5])
    assert m["R@1"] == 50.0 and m["R@5"] == 100.0 and m["Prec"] == 50.0
    assert m["mR"] == pytest.approx((50 + 100 + 100) / 3) and m["Avg"] == pytest.approx((m["mR"] + 50) / 2)
    # a collapsed (constant) scorer gets nothing: ties count against the positive
    const = bm.metrics_from_embeddings(torch.ones(30, 4), [0, 3], [1, 4], [2, 5])
    assert const["R@1"] == 0.0 and const["R@10"] == 0.0 and const["Prec"] == 0.0
    with pytest.raises(ValueError, match="score_fn"):
        bm.metrics_from_scores(lambda qb: S[qb, :5], 6, [0, 3], [1, 4], [2, 5])
    with pytest.raises(ValueError, match="negative_idx"):
        bm.metrics_from_scores(lambda qb: S[qb], 6, [0, 3], [1, 4], [2, 6])


def test_eval_cli_bad_flags_exit_2(tmp_path, capsys, monkeypatch):
    """`python -m solar.eval` checks its flags before loading anything: exit status 2, one error line."""
    from solar.eval import main
    base = ["--ckpt", str(tmp_path / "model"), "--bench", str(tmp_path / "bench")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for extra, message in [(["--device", "gpu"], "--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
                           (["--device", "cuda"], "--device: 'cuda' was asked for but torch sees no CUDA device"),
                           (["--index-dtypes", "fp32,fp64"], "--index-dtypes: expected a comma-separated list from "
                                                             "fp32, fp16, int8"),
                           (["--batch-size", "0"], "--batch-size: expected an int >= 1, got 0"),
                           (["--threads", "-1"], "--threads: expected an int >= 0")]:
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        assert f"error: {message}" in err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "from: fp32, fp16, int8" in out and "torch CPU threads" in out and "pairs per embedding batch" in out
