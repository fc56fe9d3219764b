"""SolarRankingLoss against sentence-transformers' MultipleNegativesRankingLoss, and in a real
(2-step) SentenceTransformer fit on a tiny BERT built here from a config and a local vocab.

The tiny model never touches the hub (HF_HUB_OFFLINE=1).  Where both losses apply (cosine,
one positive column, optional negative columns, no hardness) value and gradients must agree
to fp32 rounding; the extra features (several positives, labels grouping anchors, mining,
gathering across 2 gloo ranks) are checked against their definitions.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (bash run.sh "
                                                         "installs it; or pip install -c .venv/solar-constraints.txt "
                                                         "sentence-transformers)")

WORDS = ("red blue green small large circle square triangle wooden metal left right top bottom the a of is on "
         "in and with near far bright dark").split()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 1-layer BERT (random weights) and a word-level tokenizer saved as a local model folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _model(path):
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    tr = models.Transformer(path, max_seq_length=16)
    return SentenceTransformer(modules=[tr, models.Pooling(tr.get_word_embedding_dimension(), "mean")], device="cpu")


def _sentences(n, seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (5,), generator=g))
    return [pick() for _ in range(n)]


def _embeddings(n, cols, seed, dim=12):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dim, generator=g)
    return [base + 0.7 * torch.randn(n, dim, generator=g) if c else base.clone() for c in range(cols)]


def _grads(loss_fn, embs, labels=None):
    leaves = [e.detach().clone().requires_grad_() for e in embs]
    loss = loss_fn.compute_loss_from_embeddings(leaves, labels)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("cols", [2, 3, 4])
def test_matches_multiple_negatives_ranking_loss(tiny_model_dir, cols):
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from solar_kernels.integrations.sentence_transformers import SolarRankingLoss

    model = _model(tiny_model_dir)
    embs = _embeddings(19, cols, cols)
    ours, g_ours = _grads(SolarRankingLoss(model, scale=20.0), embs)
    ref, g_ref = _grads(MultipleNegativesRankingLoss(model, scale=20.0), [e.double() for e in embs])
    assert abs(float(ours) - float(ref)) <= 2e-5 * max(1.0, abs(float(ref))), (float(ours), float(ref))
    for c, (a, b) in enumerate(zip(g_ours, g_ref)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-6, msg=f"gradient of column {c}")


def test_labels_group_anchors_and_several_positives(tiny_model_dir):
    """Anchors with the same label share positives: the loss equals the multi-positive InfoNCE
    written out directly (fp64), and differs from MNRL, which treats them as negatives."""
    from solar_kernels.integrations.sentence_transformers import SolarRankingLoss

    model = _model(tiny_model_dir)
    n, P, H, scale = 10, 2, 1, 15.0
    embs = _embeddings(n, 1 + P + H, 7)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6])
    ours, _ = _grads(SolarRankingLoss(model, scale=scale, num_positives=P), embs, labels)
    e = [torch.nn.functional.normalize(x.double(), dim=1) for x in embs]
    cand = torch.cat(e[1:])
    logits = scale * e[0] @ cand.T                                     # [n, (P + H) n]
    col_label = torch.cat([labels.repeat(P), torch.full((H * n,), -1)])
    pos = col_label[None, :] == labels[:, None]
    ref = -(torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 1) - torch.logsumexp(logits, 1)).mean()
    assert abs(float(ours) - float(ref)) < 1e-5, (float(ours), float(ref))


def test_mining_in_batch_and_over_a_corpus(tiny_model_dir):
    from solar_kernels.integrations.sentence_transformers import SolarRankingLoss, mine_hard_negatives

    model = _model(tiny_model_dir)
    embs = _embeddings(8, 3, 3)
    loss_fn = SolarRankingLoss(model, mine_k=2)
    loss_fn.compute_loss_from_embeddings(embs)
    m = loss_fn.last_mined
    e = [torch.nn.functional.normalize(x, dim=1) for x in embs]
    s = e[0] @ torch.cat(e[1:]).T
    s[torch.arange(8), torch.arange(8)] = float("-inf")                 # own positive is no negative
    best = s.topk(2, dim=1).indices
    assert torch.equal(m["column"] * 8 + m["row"], best) and bool((m["rank"] == 0).all())
    anchors, positives = _sentences(6, 1), _sentences(6, 2)
    corpus = positives + _sentences(10, 3)
    cols = mine_hard_negatives(model, anchors, positives, corpus, num_negatives=2)
    assert list(cols) == ["anchor", "positive", "negative_1", "negative_2"]
    for a, p, n1, n2 in zip(*cols.values()):
        assert n1 != p and n2 != p and n1 in corpus and n1 != n2
        emb = model.encode([a, n1, n2], normalize_embeddings=True)
        assert float(emb[0] @ emb[1]) >= float(emb[0] @ emb[2]) - 1e-6   # hardest first


def test_bad_arguments_are_named(tiny_model_dir):
    from solar_kernels.integrations.sentence_transformers import SolarRankingLoss

    model = _model(tiny_model_dir)
    with pytest.raises(ValueError, match="similarity_fct must be cosine"):
        SolarRankingLoss(model, similarity_fct=st.util.dot_score)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        SolarRankingLoss(model, scale=0)
    with pytest.raises(ValueError, match="labels must be None or \\[4\\] integer"):
        SolarRankingLoss(model).compute_loss_from_embeddings(_embeddings(4, 2, 0), torch.rand(4))
    with pytest.raises(ValueError, match="at least 2 positive column"):
        SolarRankingLoss(model, num_positives=2).compute_loss_from_embeddings(_embeddings(4, 2, 0))


def test_two_step_fit(tiny_model_dir, tmp_path):
    """A real SentenceTransformerTrainer run (2 optimizer steps) with the loss; the weights move."""
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (sentence-transformers[train])")
    pytest.importorskip("accelerate", reason="accelerate is not installed (sentence-transformers[train])")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from solar_kernels.integrations.sentence_transformers import SolarRankingLoss

    model = _model(tiny_model_dir)
    data = datasets.Dataset.from_dict({"anchor": _sentences(8, 4), "positive": _sentences(8, 5),
                                       "negative": _sentences(8, 6)})
    before = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                                max_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
                                                logging_steps=1, use_cpu=True, dataloader_num_workers=0)
    loss = SolarRankingLoss(model, hardness=0.5)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


WORLD, N_LOCAL = 2, 6


def _dist_worker(di, path):
    import torch.distributed as dist
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from solar_kernels.integrations.sentence_transformers import SolarRankingLoss

    torch.set_num_threads(1)
    rank = dist.get_rank()
    model = _model(path)
    embs = [e[rank * N_LOCAL:(rank + 1) * N_LOCAL] for e in _embeddings(N_LOCAL * WORLD, 3, 11)]
    ours, g_ours = _grads(SolarRankingLoss(model, gather_across_devices=True), embs)
    ref, g_ref = _grads(MultipleNegativesRankingLoss(model, gather_across_devices=True), [e.double() for e in embs])
    return {"ours": float(ours), "ref": float(ref),
            "grad_err": max(float((a.double() - b).abs().max()) for a, b in zip(g_ours, g_ref)),
            "grad_max": max(float(b.abs().max()) for b in g_ref)}


@pytest.mark.dist
def test_gather_across_two_gloo_ranks_matches_mnrl(tiny_model_dir, tmp_path):
    from dist_harness import run_ranks

    res = run_ranks(_dist_worker, tmp_path, tiny_model_dir, world=WORLD)
    mean_ref = sum(r["ref"] for r in res) / WORLD
    for r in res:
        assert abs(r["ours"] - mean_ref) < 2e-5, res          # every rank: the mean of MNRL's rank values
        assert r["grad_err"] < 2e-6 and r["grad_max"] > 1e-3, res
    assert abs(res[0]["ref"] - res[1]["ref"]) > 1e-4            # the ranks' own values really differ
