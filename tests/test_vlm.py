"""Vision-language detectors on tiny CLIP models whose weights the tests create (no real CLIP weights here).

Each score is checked against a hand-written numpy computation on the same embeddings, MCM also against
pytorch-ood 0.4's implementation (when it can be imported), and an aligned toy backbone (class prototypes shared by
the two towers) checks that the methods separate what they should.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

import oodscope  # noqa: E402
from oodscope.vlm import load_clip  # noqa: E402
from oodscope.vlm.corpus import load_corpus, parse_index_noun  # noqa: E402
from oodscope.vlm.winclip import (ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, harmonic_aggregation,  # noqa: E402
                                  sliding_windows, state_prompts)
from vlm_models import AlignedClip, coloured_images, save_tiny_clip, tiny_clip  # noqa: E402

CLASSES = ["apple", "leaf", "sky"]


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((7, 3, 40, 40)).astype(np.float32)


# -- the backbone ----------------------------------------------------------------------------------------------
def test_embeddings_equal_transformers_own_features(clip, images):
    import torch

    texts = ["a photo of a apple.", "a photo of a sky."]
    tokens = clip.tokenize(texts)
    with torch.no_grad():
        pixels = clip.preprocess(torch.from_numpy(images))
        ref_image = clip.model.get_image_features(pixel_values=pixels)
        ref_text = clip.model.get_text_features(input_ids=torch.tensor(tokens["input_ids"]),
                                                attention_mask=torch.tensor(tokens["attention_mask"]))
    ref_image = getattr(ref_image, "pooler_output", ref_image).numpy()
    ref_text = getattr(ref_text, "pooler_output", ref_text).numpy()
    global_, patches = clip.encode_images(images)
    np.testing.assert_allclose(global_, ref_image, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clip.encode_texts(texts), ref_text, rtol=1e-4, atol=1e-5)
    assert patches.shape == (7, 16, global_.shape[1]) and clip.grid == (4, 4)


def test_patch_tokens_are_the_last_block_with_self_attention_only(clip, images):
    """MaskCLIP local features by hand from the hidden state entering the last block and its weights."""
    import torch

    with torch.no_grad():
        pixels = clip.preprocess(torch.from_numpy(images))
        hidden = clip.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    h = hidden.double().numpy()
    layer = clip.model.vision_model.encoder.layers[-1]
    w = {k: v.double().numpy() for k, v in layer.state_dict().items()}
    post = {k: v.double().numpy() for k, v in clip.model.vision_model.post_layernorm.state_dict().items()}
    proj = clip.model.visual_projection.weight.double().numpy()

    def norm(x, weight, bias, eps=1e-5):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * weight + bias

    x = norm(h, w["layer_norm1.weight"], w["layer_norm1.bias"])
    v = x @ w["self_attn.v_proj.weight"].T + w["self_attn.v_proj.bias"]
    y = h + v @ w["self_attn.out_proj.weight"].T + w["self_attn.out_proj.bias"]
    z = norm(y, w["layer_norm2.weight"], w["layer_norm2.bias"])
    fc1 = z @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]
    act = fc1 * (1.0 / (1.0 + np.exp(-1.702 * fc1)))  # quick_gelu, CLIP's activation
    y = y + act @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
    expected = norm(y[:, 1:], post["weight"], post["bias"]) @ proj.T
    assert clip.model.config.vision_config.hidden_act == "quick_gelu"
    np.testing.assert_allclose(clip.encode_images(images)[1], expected, rtol=1e-4, atol=1e-5)


def test_a_window_of_every_patch_is_the_global_embedding_and_windows_see_only_their_patches(clip, images):
    everything = np.ones((1, 16), dtype=bool)
    global_, _ = clip.encode_images(images, patches=False)
    np.testing.assert_allclose(clip.encode_windows(images, everything)[:, 0], global_, rtol=1e-4, atol=1e-5)
    windows = sliding_windows(clip.grid, 2)
    exact = images[:, :, :32, :32].copy()  # the model's size: no resampling spreads a change
    changed = exact.copy()
    changed[:, :, 24:, 24:] = 0.5  # the bottom-right corner: patch (3, 3) of the 4 x 4 grid only
    before, after = clip.encode_windows(exact, windows), clip.encode_windows(changed, windows)
    moved = np.abs(after - before).max(axis=(0, 2)) > 1e-6
    assert moved.tolist() == windows[:, 15].tolist()  # exactly the windows that contain that patch


def test_embeddings_go_through_the_extraction_cache(tmp_path, images):
    cached = tiny_clip(use_cache=True, cache_dir=tmp_path)
    first = cached.encode_texts(["a photo of a leaf."])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("prompts-")
    np.testing.assert_array_equal(cached.encode_texts(["a photo of a leaf."]), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # a hit, no new entry
    cached.encode_texts(["a photo of a sky."])
    assert len(list(tmp_path.iterdir())) == 2  # another prompt string, another key
    cached.encode_images(images)
    assert len(list(tmp_path.iterdir())) == 3


def test_a_folder_that_is_not_a_clip_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_clip(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model, not a CLIP model"):
        load_clip(tmp_path)
    broken = save_tiny_clip(tmp_path / "broken")
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_clip(broken)
    with pytest.raises(ValueError, match="no CLIP model: pass model="):
        oodscope.create("mcm").fit(CLASSES)


# -- MCM and GL-MCM --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_mcm_is_minus_the_max_softmax_of_cosines_over_t(clip, images, temperature):
    mcm = oodscope.create("mcm", model=clip, temperature=temperature).fit(CLASSES)
    texts = _unit(clip.encode_texts([f"a photo of a {c}." for c in CLASSES]))
    image = _unit(clip.encode_images(images)[0])
    expected = -_softmax(image @ texts.T / temperature).max(axis=1)
    np.testing.assert_allclose(mcm.score(images), expected, rtol=1e-10, atol=1e-12)
    assert mcm.classes_ == CLASSES


def test_mcm_equals_pytorch_ood_mcm(clip, images):
    """pytorch-ood 0.4's MCM (its package imports torchvision; the detector module alone is loaded)."""
    import importlib
    import importlib.util
    import sys
    import types

    import torch

    spec = importlib.util.find_spec("pytorch_ood")
    if spec is None:
        pytest.skip("pytorch-ood is not installed (pip install --no-deps pytorch-ood==0.4.0)")
    saved = {k: sys.modules.get(k) for k in ("pytorch_ood", "pytorch_ood.detector")}
    try:
        root = spec.submodule_search_locations[0]
        for name, path in (("pytorch_ood", root), ("pytorch_ood.detector", f"{root}/detector")):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
        reference = importlib.import_module("pytorch_ood.detector.mcm").MCM
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module
    texts = torch.from_numpy(clip.encode_texts([f"a photo of a {c}." for c in CLASSES]))
    features = torch.from_numpy(clip.encode_images(images)[0])
    theirs = reference(None, texts, temperature=1.0).predict_features(features).double().numpy()
    ours = oodscope.create("mcm", model=clip).fit(CLASSES).score(images)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_gl_mcm_adds_lambda_times_the_best_local_mcm(clip, images):
    detector = oodscope.create("gl_mcm", model=clip, lambda_local=0.5).fit(CLASSES)
    texts = _unit(clip.encode_texts([f"a photo of a {c}." for c in CLASSES]))
    global_, patches = clip.encode_images(images)
    glob = _softmax(_unit(global_) @ texts.T).max(axis=1)
    local = np.array([max(_softmax(_unit(p) @ texts.T)[i].max() for i in range(16)) for p in patches])
    np.testing.assert_allclose(detector.score(images), -(glob + 0.5 * local), rtol=1e-10)


# -- NegLabel --------------------------------------------------------------------------------------------------
WORDS = ["bicycle", "cloud", "river", "table", "guitar", "mountain", "window", "bread", "engine", "forest",
         "apple", "bridge", "candle", "garden"]


def test_neglabel_mining_grouping_and_score_by_hand(clip, images):
    detector = oodscope.create("neglabel", model=clip, corpus=WORDS, n_negatives=8, n_groups=3, seed=4).fit(CLASSES)
    ids = _unit(clip.encode_texts([f"a photo of a {c}." for c in CLASSES]))
    candidates = [w for w in WORDS if w not in CLASSES]  # "apple" is an ID class, never a negative
    cand = _unit(clip.encode_texts([f"a photo of a {w}." for w in candidates]))
    distance = [np.percentile([-float(c @ e) for e in ids], 5) for c in cand]  # eta = 0.05
    chosen = sorted(range(len(candidates)), key=lambda i: -distance[i])[:8]
    assert detector.negative_labels_ == [candidates[i] for i in chosen]
    assert "apple" not in detector.negative_labels_
    permutation = np.random.default_rng(4).permutation(8)
    groups = [permutation[0:3], permutation[3:6], permutation[6:8]]  # np.array_split sizes 3, 3, 2
    image = _unit(clip.encode_images(images)[0])
    expected = []
    for h in image:
        pos = sum(np.exp(h @ e / 0.01) for e in ids)
        per_group = [pos / (pos + sum(np.exp(h @ cand[chosen[j]] / 0.01) for j in g)) for g in groups]
        expected.append(-np.mean(per_group))
    np.testing.assert_allclose(detector.score(images), expected, rtol=1e-8)
    assert detector.corpus_.startswith("given list")


def test_corpus_sources_wordnet_files_and_the_bundled_fallback(tmp_path, monkeypatch):
    from oodscope.vlm import corpus

    index = "  1 license text line\n'hood n 1 2 @ ; 1 0 08641944\nice_cream n 1 1 @ 1 1 07609840\nice_cream n 1\nDog n 2\n"
    assert parse_index_noun(index) == ["'hood", "ice cream", "dog"]
    monkeypatch.setattr(corpus, "nltk_data_dirs", lambda: [tmp_path / "nltk"])
    monkeypatch.setattr(corpus, "DEBIAN_WORDNET", tmp_path / "debian")
    fallback = load_corpus("auto")
    assert fallback.source.startswith("bundled list") and len(fallback.words) == 5000 and "apple" in fallback.words
    with pytest.raises(ValueError, match="no WordNet data found"):
        load_corpus("wordnet")
    (tmp_path / "debian").mkdir()
    (tmp_path / "debian" / "index.noun").write_text(index)
    found = load_corpus("auto")
    assert found.words == ("'hood", "ice cream", "dog") and "Debian wordnet" in found.source
    (tmp_path / "nltk" / "corpora" / "wordnet").mkdir(parents=True)
    (tmp_path / "nltk" / "corpora" / "wordnet" / "index.noun").write_text("cat n 1\n")
    assert load_corpus("auto").words == ("cat",) and "NLTK data" in load_corpus("auto").source
    with pytest.raises(ValueError, match="not 'auto'"):
        load_corpus(str(tmp_path / "nowhere.txt"))


def test_neglabel_records_the_bundled_corpus_when_no_wordnet_is_installed(monkeypatch, tmp_path):
    from oodscope.vlm import corpus

    monkeypatch.setattr(corpus, "nltk_data_dirs", lambda: [])
    monkeypatch.setattr(corpus, "DEBIAN_WORDNET", tmp_path)
    detector = oodscope.create("neglabel", model=AlignedClip(), n_negatives=500, n_groups=10).fit(CLASSES)
    assert detector.corpus_.startswith("bundled list") and len(detector.negative_labels_) == 500
    assert not set(detector.negative_labels_) & set(CLASSES)


# -- the aligned toy model: the methods separate what they should ---------------------------------------------
@pytest.mark.parametrize("name", ["mcm", "gl_mcm", "neglabel"])
def test_aligned_toy_model_ranks_the_planted_ood_images_last(name):
    params = {"corpus": "bundled", "n_negatives": 1000, "n_groups": 10} if name == "neglabel" else {}
    detector = oodscope.create(name, model=AlignedClip(), **params).fit(CLASSES)
    inliers = coloured_images(CLASSES * 4, seed=1)
    outliers = coloured_images(["banana", "normal", "banana", "normal"], seed=2)
    scores = detector.score(np.concatenate([inliers, outliers]))
    assert scores[len(inliers):].min() > scores[:len(inliers)].max()


def test_winclip_map_peaks_on_the_planted_patch_and_flags_its_image():
    toy = AlignedClip(image_size=64)
    winclip = oodscope.create("winclip", model=toy).fit(coloured_images(["normal"] * 3, size=64))
    images = coloured_images(["normal"] * 6, seed=1, size=64)
    images[3:, :, 24:32, 32:40] = 1.0  # patch (3, 4) of the 8 x 8 grid turns white: the "anomalous" colour
    scores, maps = winclip.score_and_map(images)
    assert maps.shape == (6, 64, 64) and scores[3:].min() > scores[:3].max()
    for m in maps[3:]:
        row, col = np.unravel_index(m.argmax(), m.shape)
        assert 24 <= row < 32 and 32 <= col < 40
    assert maps[3:, 24:32, 32:40].mean() > maps[:3, 24:32, 32:40].mean()


def test_winclip_scores_and_map_by_hand(clip):
    rng = np.random.default_rng(3)
    train, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((3, 3, 32, 32)).astype(np.float32)
    winclip = oodscope.create("winclip", model=clip, object_name="bottle", scales=(2, 3)).fit(train)
    states = []
    for words in (NORMAL_STATES, ANOMALOUS_STATES):
        prompts = [t.format(s.format("bottle")) for s in words for t in TEMPLATES]
        states.append(_unit(_unit(clip.encode_texts(prompts)).mean(axis=0)))
    states = np.stack(states)

    def ascore(f):
        return _softmax(_unit(f) @ states.T / 0.07)[..., 1]

    image = ascore(clip.encode_images(test, patches=False)[0])
    maps = [np.repeat(image[:, None], 16, axis=1)]
    for size in (2, 3):
        windows = sliding_windows((4, 4), size)
        s = ascore(clip.encode_windows(test, windows))
        maps.append(np.stack([[1.0 / np.mean([1.0 / s[n, u] for u in range(len(windows)) if windows[u, p]])
                               for p in range(16)] for n in range(3)]))
    grid = np.mean(maps, axis=0).reshape(3, 4, 4)
    scores, full = winclip.score_and_map(test)
    np.testing.assert_allclose(scores, image, rtol=1e-10)
    import torch

    upsampled = torch.nn.functional.interpolate(torch.from_numpy(grid[:, None]), size=(32, 32), mode="bilinear",
                                                align_corners=False)[:, 0].numpy()  # the map at the input size
    np.testing.assert_allclose(full, upsampled, rtol=1e-8)


def test_prompts_windows_and_harmonic_mean_pieces():
    assert len(state_prompts(NORMAL_STATES, "x")) == 7 * 21 and len(state_prompts(ANOMALOUS_STATES, "x")) == 5 * 21
    assert state_prompts(("{} with flaw",), "bottle", ("a photo of a {}.",)) == ["a photo of a bottle with flaw."]
    windows = sliding_windows((4, 5), 2)
    assert windows.shape == (3 * 4, 20) and (windows.sum(axis=1) == 4).all()
    scores = np.array([[0.5, 0.25]])
    two = np.array([[True, True, False], [False, True, True]])
    np.testing.assert_allclose(harmonic_aggregation(scores, two), [[0.5, 2 / (2 + 4), 0.25]])
    with pytest.raises(ValueError, match="does not fit"):
        sliding_windows((4, 4), 5)


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes, message", [
    ([], "empty"), (["apple", "Apple", "sky"], "duplicate class names"), ("apple", "not a single string"),
    ([0, 1, 2], "not strings"), (["apple"], "at least two"), (["apple", " "], "empty"),
])
def test_bad_class_lists_are_refused(clip, classes, message):
    with pytest.raises(ValueError, match=message):
        oodscope.create("mcm", model=clip).fit(classes)


def test_bad_images_and_parameters_are_refused(clip, images):
    mcm = oodscope.create("mcm", model=clip)
    with pytest.raises(oodscope.NotFittedError):
        mcm.score(images)
    mcm.fit(CLASSES)
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mcm.score(bad)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        mcm.score(images[:, :2])
    with pytest.raises(ValueError, match="smaller than one CLIP patch"):
        mcm.score(images[:, :, :4, :4])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        mcm.score(images * 255)
    with pytest.raises(ValueError, match="one '{}'"):
        oodscope.create("mcm", model=clip, prompt="a photo").fit(CLASSES)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        oodscope.create("mcm", model=clip, temperature=0).fit(CLASSES)
    with pytest.raises(ValueError, match="fewer than n_groups"):
        oodscope.create("neglabel", model=clip, corpus=WORDS, n_groups=50).fit(CLASSES)
    with pytest.raises(ValueError, match="square"):
        oodscope.create("winclip", model=clip).fit(images[:, :, :, :32])
    with pytest.raises(ValueError, match="object_name"):
        oodscope.create("winclip", model=clip, object_name="").fit(images)


def test_saved_and_loaded_detector_gives_identical_scores(clip, images, tmp_path):
    detector = oodscope.create("neglabel", model=clip, corpus=WORDS, n_negatives=6, n_groups=2).fit(CLASSES)
    path = detector.save(tmp_path / "neglabel.oodscope")
    loaded = oodscope.load(path, model=clip)
    assert loaded.negative_labels_ == detector.negative_labels_ and loaded.corpus_ == detector.corpus_
    np.testing.assert_array_equal(loaded.score(images), detector.score(images))


# -- LoCoOp ---------------------------------------------------------------------------------------------------
def test_context_prompts_with_the_words_own_embeddings_equal_the_text_tower(clip):
    import torch

    prompts = ["a cat is apple.", "a cat is sky."]
    ids = torch.as_tensor(clip.tokenize(prompts)["input_ids"])
    with torch.no_grad():
        out = clip.context_text_forward(ids, clip.token_embeddings(ids[0, 1:5]))  # "a cat is " as the context
    np.testing.assert_allclose(out.numpy(), clip.encode_texts(prompts), rtol=1e-4, atol=1e-5)


def test_locoop_loss_by_hand():
    import torch

    rng = np.random.default_rng(0)
    g, p = rng.normal(size=(4, 5)) * 3, rng.normal(size=(4, 6, 5)) * 3
    y = np.array([0, 3, 1, 4])
    from oodscope.vlm.locoop import locoop_loss

    total, ce, ood = locoop_loss(torch.tensor(g), torch.tensor(p), torch.tensor(y), 2, 0.25)
    expected_ce = np.mean([-np.log(_softmax(g[i])[y[i]]) for i in range(4)])
    entropies = []
    for i in range(4):
        for j in range(6):
            probs = _softmax(p[i, j])
            if y[i] not in np.argsort(-probs)[:2]:  # the label is not among the region's top 2: an OOD region
                entropies.append(-(probs * np.log(probs)).sum())
    assert 0 < len(entropies) < 24
    np.testing.assert_allclose([float(ce), float(ood)], [expected_ce, -np.mean(entropies)], rtol=1e-10)
    np.testing.assert_allclose(float(total), expected_ce - 0.25 * np.mean(entropies), rtol=1e-10)


@pytest.fixture(scope="module")
def few_shot():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 4)
    images = np.clip(rng.normal(0.2 + 0.3 * labels[:, None, None, None], 0.05, (12, 3, 32, 32)), 0, 1)
    return images.astype(np.float32), labels


def test_locoop_trains_only_the_context_and_scores_with_gl_mcm_of_the_learned_prompts(clip, few_shot, images):
    import torch

    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    detector = oodscope.create("locoop", model=clip, n_ctx=4, epochs=20, top_k=1, batch_size=4, seed=1)
    detector.fit(CLASSES, *few_shot)
    assert all(torch.equal(before[k], v) for k, v in clip.model.state_dict().items())  # CLIP stays frozen
    assert detector.history_[-1] < 0.6 * detector.history_[0]  # the loss goes down
    ids = torch.as_tensor(clip.tokenize([f"x x x x {c}." for c in CLASSES])["input_ids"])
    with torch.no_grad():
        texts = _unit(clip.context_text_forward(ids, torch.from_numpy(detector.context_)).numpy())
    np.testing.assert_allclose(detector.text_embeddings_, texts, rtol=1e-5, atol=1e-6)
    global_, patches = clip.encode_images(images)
    expected = -(_softmax(_unit(global_) @ texts.T).max(axis=1) + _softmax(_unit(patches) @ texts.T).max(axis=(1, 2)))
    np.testing.assert_allclose(detector.score(images), expected, rtol=1e-5)
    again = oodscope.create("locoop", model=clip, n_ctx=4, epochs=20, top_k=1, batch_size=4, seed=1)
    np.testing.assert_array_equal(again.fit((CLASSES, *few_shot)).context_, detector.context_)  # seeded


def test_locoop_resumes_an_interrupted_fit_from_its_checkpoint(clip, few_shot, tmp_path, monkeypatch):
    """The engine's fit killed after some epochs resumes from its per-epoch checkpoint to exactly the uninterrupted
    result; a checkpoint of another fit (seed, class names) is refused; a non-finite loss stops the fit."""
    import oodscope.training.objectives.locoop_reg as objective_module

    settings = dict(model=clip, n_ctx=4, epochs=6, top_k=1, batch_size=4, seed=1)
    whole = oodscope.create("locoop", **settings).fit(CLASSES, *few_shot)
    real_loss, calls = objective_module.locoop_loss, []
    steps_per_epoch = -(-len(few_shot[1]) // 4)

    def dies_in_epoch_4(*args):
        calls.append(1)
        if len(calls) > 3 * steps_per_epoch:
            raise KeyboardInterrupt
        return real_loss(*args)

    folder = tmp_path / "locoop"
    monkeypatch.setattr(objective_module, "locoop_loss", dies_in_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        oodscope.create("locoop", checkpoint=str(folder), **settings).fit(CLASSES, *few_shot)
    monkeypatch.setattr(objective_module, "locoop_loss", real_loss)
    resumed = oodscope.create("locoop", checkpoint=str(folder), **settings).fit(CLASSES, *few_shot)
    np.testing.assert_array_equal(resumed.context_, whole.context_)
    assert resumed.history_ == whole.history_
    np.testing.assert_array_equal(resumed.score(few_shot[0]), whole.score(few_shot[0]))
    with pytest.raises(ValueError, match="was written for schedule"):
        oodscope.create("locoop", checkpoint=str(folder), **{**settings, "seed": 2}).fit(CLASSES, *few_shot)
    with pytest.raises(ValueError, match="was written for model"):  # other prompts: the learner's checkpoint_key
        oodscope.create("locoop", checkpoint=str(folder), **settings).fit(["pear", "leaf", "sky"], *few_shot)
    monkeypatch.setattr(objective_module, "locoop_loss", lambda *args: (real_loss(*args)[0] * float("nan"),) * 3)
    with pytest.raises(FloatingPointError, match="the locoop_reg loss is nan at epoch 1"):
        oodscope.create("locoop", **settings).fit(CLASSES, *few_shot)


def test_locoop_refuses_bad_training_data(clip, few_shot):
    images, labels = few_shot
    locoop = oodscope.create("locoop", model=clip, n_ctx=4, epochs=1, top_k=1)
    with pytest.raises(ValueError, match="needs labelled ID images"):
        locoop.fit(CLASSES)
    with pytest.raises(ValueError, match=r"labels must lie in 0..2"):
        locoop.fit(CLASSES, images, labels + 1)
    with pytest.raises(ValueError, match="integer class indices"):
        locoop.fit(CLASSES, images, labels[:-1])
    with pytest.raises(ValueError, match="top_k=200 must be smaller"):
        oodscope.create("locoop", model=clip).fit(CLASSES, images, labels)
    with pytest.raises(ValueError, match="no context_text_forward"):
        oodscope.create("locoop", model=AlignedClip(), top_k=1).fit(CLASSES, images, labels)


# -- CLIPN ----------------------------------------------------------------------------------------------------
def test_clipn_losses_by_hand_with_the_authors_diagonal_pairs():
    import torch

    from oodscope.vlm.clipn import clipn_losses

    rng = np.random.default_rng(1)
    f, g, h = (_unit(rng.normal(size=(4, 6))) for _ in range(3))
    yes, no, tso = clipn_losses(torch.tensor(f), torch.tensor(g), torch.tensor(h), torch.eye(4), 10.0)
    p_yes = 1.0 / (1.0 + np.exp(10.0 * (f @ h.T - f @ g.T)))  # softmax of (s<f,g>, s<f,h>), the "yes" part
    expected_yes = -np.log(np.diag(p_yes)).sum() / 4
    expected_no = -np.log(1 - p_yes)[~np.eye(4, dtype=bool)].sum() / (16 - 4)
    expected_tso = np.mean(2 - np.sqrt(2 - 2 * (g * h).sum(axis=1) + 1e-4))
    np.testing.assert_allclose([float(yes), float(no), float(tso)], [expected_yes, expected_no, expected_tso],
                               rtol=1e-10)


def test_the_no_encoder_starts_as_clips_text_encoder(clip):
    import torch

    from oodscope.vlm.clipn import NoTextEncoder

    prompts = [f"a photo of a {c}." for c in CLASSES]
    ids = torch.as_tensor(clip.tokenize(prompts)["input_ids"])
    with torch.no_grad():
        start = NoTextEncoder(clip.model, 4)(ids, torch.tensor([0, 4, 2]))  # zero prompts: a plain copy
    np.testing.assert_allclose(start.numpy(), _unit(clip.encode_texts(prompts)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scoring", ["atd", "ctw"])
def test_clipn_trains_the_no_encoder_only_and_scores_by_hand(clip, few_shot, images, scoring):
    import torch

    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    detector = oodscope.create("clipn", model=clip, n_prompts=4, epochs=8, batch_size=4, scoring=scoring, seed=2)
    detector.fit(CLASSES, *few_shot)
    assert all(torch.equal(before[k], v) for k, v in clip.model.state_dict().items())  # CLIP stays frozen
    assert detector.history_[-1] < detector.history_[0]
    assert np.abs(detector.no_text_embeddings_ - detector.text_embeddings_).max() > 1e-3  # "no" moved away
    f = _unit(clip.encode_images(images)[0])
    s = clip.logit_scale
    yes, no = s * f @ detector.text_embeddings_.T, s * f @ detector.no_text_embeddings_.T
    p_yes = np.exp(yes) / (np.exp(yes) + np.exp(no))
    p = _softmax(yes)
    expected = (-(p_yes * p).sum(axis=1) if scoring == "atd"
                else -p_yes[np.arange(len(p)), p.argmax(axis=1)])
    np.testing.assert_allclose(detector.score(images), expected, rtol=1e-10)
    again = oodscope.create("clipn", model=clip, n_prompts=4, epochs=8, batch_size=4, scoring=scoring, seed=2)
    np.testing.assert_array_equal(again.fit((CLASSES, *few_shot)).no_text_embeddings_, detector.no_text_embeddings_)


def test_clipn_refuses_unlabelled_training_images(clip, few_shot):
    with pytest.raises(ValueError, match="needs labelled ID images"):
        oodscope.create("clipn", model=clip).fit(CLASSES, few_shot[0])
    with pytest.raises(ValueError, match="scoring must be one of"):
        oodscope.create("clipn", model=clip, scoring="msp").fit(CLASSES, *few_shot)


# -- WinCLIP+ -------------------------------------------------------------------------------------------------
def test_patch_tokens_are_the_last_hidden_state_after_the_final_norm(clip, images):
    import torch

    with torch.no_grad():
        pixels = clip.preprocess(torch.from_numpy(images))
        out = clip.model.vision_model(pixel_values=pixels)
        expected = clip.model.vision_model.post_layernorm(out.last_hidden_state[:, 1:]).numpy()
    np.testing.assert_allclose(clip.encode_tokens(images), expected, rtol=1e-4, atol=1e-5)


def test_winclip_plus_by_hand(clip):
    from oodscope.vlm.winclip import association

    rng = np.random.default_rng(5)
    shots, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((3, 3, 32, 32)).astype(np.float32)
    plus = oodscope.create("winclip_plus", model=clip, scales=(2,)).fit(shots)
    zero_scores, zero_map = oodscope.create("winclip", model=clip, scales=(2,)).fit(shots).score_and_map(test)

    def nearest(query, memory):  # min over the memory of (1 - cos) / 2, one query row at a time
        return np.array([min((1 - float(q @ r)) / 2 for r in _unit(memory)) for q in _unit(query)])

    tokens, memory = clip.encode_tokens(test), clip.encode_tokens(shots).reshape(-1, 32)
    patch = np.stack([nearest(t, memory) for t in tokens])
    windows = sliding_windows((4, 4), 2)
    wq = clip.encode_windows(test, windows)
    wm = clip.encode_windows(shots, windows).reshape(-1, wq.shape[-1])
    ws = np.stack([nearest(w, wm) for w in wq])
    window_map = np.stack([[len(windows[:, p].nonzero()[0]) / sum(1 / ws[n, u] for u in windows[:, p].nonzero()[0])
                            for p in range(16)] for n in range(3)])
    grid = (patch + window_map) / 2
    import torch

    few = torch.nn.functional.interpolate(torch.from_numpy(grid.reshape(3, 1, 4, 4)), size=(32, 32),
                                          mode="bilinear", align_corners=False)[:, 0].numpy()
    scores, maps = plus.score_and_map(test)
    np.testing.assert_allclose(scores, (zero_scores + few.reshape(3, -1).max(axis=1)) / 2, rtol=1e-6)
    np.testing.assert_allclose(maps, (zero_map + few) / 2, rtol=1e-6)
    assert association(memory[:3], memory).max() < 1e-12  # a reference patch is at distance 0 from its memory


def test_winclip_plus_peaks_on_the_planted_patch_of_the_toy_model():
    toy = AlignedClip(image_size=64)
    plus = oodscope.create("winclip_plus", model=toy).fit(coloured_images(["normal"] * 3, size=64))
    images = coloured_images(["normal"] * 6, seed=1, size=64)
    images[3:, :, 24:32, 32:40] = 1.0
    scores, maps = plus.score_and_map(images)
    assert scores[3:].min() > scores[:3].max()
    for m in maps[3:]:
        row, col = np.unravel_index(m.argmax(), m.shape)
        assert 24 <= row < 32 and 32 <= col < 40


def test_oodscope_ad_runs_winclip_plus_from_a_clip_folder(tmp_path):
    from PIL import Image

    from oodscope.cli import main
    from vlm_models import tiny_clip_folder

    rng = np.random.default_rng(0)
    root = tmp_path / "tile"
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.normal(128, 10, (32, 32, 3)).clip(0, 255).astype(np.uint8)).save(
            root / f"train/good/{i:03d}.png")
    for i in range(2):
        Image.fromarray(rng.normal(128, 10, (32, 32, 3)).clip(0, 255).astype(np.uint8)).save(
            root / f"test/good/{i:03d}.png")
        image = rng.normal(128, 10, (32, 32, 3)).clip(0, 255).astype(np.uint8)
        image[8:16, 8:16] = 255
        Image.fromarray(image).save(root / f"test/crack/{i:03d}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:16, 8:16] = 255
        Image.fromarray(mask).save(root / f"ground_truth/crack/{i:03d}_mask.png")
    out = tmp_path / "out"
    model = json.dumps(str(tiny_clip_folder()))
    assert main(["ad", str(root), "--detectors", "winclip_plus", "--size", "32", "--out", str(out),
                 "--param", f"winclip_plus.model={model}", "--param", 'winclip_plus.object_name="tile"']) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert {r["detector"] for r in records} >= {"winclip_plus"}


# -- AnomalyCLIP ----------------------------------------------------------------------------------------------
def test_anomalyclip_focal_and_dice_losses_by_hand():
    import torch

    from oodscope.vlm.anomalyclip import dice_loss, focal_loss

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 2, 3, 3))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    mask = (rng.random((2, 3, 3)) > 0.6).astype(np.float64)
    one_hot = np.stack([1 - mask, mask], axis=1).clip(1e-5, 1 - 1e-5)
    pt = (one_hot * p).sum(axis=1) + 1e-5
    np.testing.assert_allclose(float(focal_loss(torch.tensor(p), torch.tensor(mask))),
                               np.mean(-(1 - pt) ** 2 * np.log(pt)), rtol=1e-10)
    a = p[:, 1].reshape(2, -1)
    dice = 1 - np.mean((2 * (a * mask.reshape(2, -1)).sum(1) + 1) / (a.sum(1) + mask.reshape(2, -1).sum(1) + 1))
    np.testing.assert_allclose(float(dice_loss(torch.tensor(p[:, 1]), torch.tensor(mask))), dice, rtol=1e-10)


def test_dpam_paths_by_hand(clip, images):
    import torch

    from oodscope.vlm.anomalyclip import dpam_features

    with torch.no_grad():
        pixels = clip.preprocess(torch.from_numpy(images))
        plain_global, plain = dpam_features(clip, pixels, (1, 2), 0)  # no dual path: CLIP's own tokens
        hidden = clip.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        dual_global, dual = dpam_features(clip, pixels, (1, 2), 1)  # the last block gets the V-V path
    np.testing.assert_allclose(plain_global.numpy(), clip.encode_images(images)[0], rtol=1e-4, atol=1e-5)
    for layer, tokens in zip((1, 2), plain):
        np.testing.assert_allclose(tokens.numpy(), clip._project(hidden[layer][:, 1:]).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dual_global.numpy(), plain_global.numpy(), rtol=1e-5, atol=1e-6)  # same Q-K path
    np.testing.assert_allclose(dual[0].numpy(), plain[0].numpy(), rtol=1e-6)  # block 1 is before the dual path
    block = clip.model.vision_model.encoder.layers[-1]
    w = {k: v.double().numpy() for k, v in block.state_dict().items()}
    h = hidden[1].double().numpy()
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    x = (h - mu) / np.sqrt(var + 1e-5) * w["layer_norm1.weight"] + w["layer_norm1.bias"]
    v = x @ w["self_attn.v_proj.weight"].T + w["self_attn.v_proj.bias"]
    heads = clip.model.config.vision_config.num_attention_heads
    vh = v.reshape(len(v), v.shape[1], heads, -1).transpose(0, 2, 1, 3)
    attn = _softmax(vh @ vh.transpose(0, 1, 3, 2) * vh.shape[-1] ** -0.5)
    out = (attn @ vh).transpose(0, 2, 1, 3).reshape(v.shape)
    expected = h + out @ w["self_attn.out_proj.weight"].T + w["self_attn.out_proj.bias"]  # V-V, no MLP
    np.testing.assert_allclose(dual[1].numpy(), clip._project(torch.from_numpy(expected[:, 1:]).float()).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_anomalyclip_prompts_with_the_words_own_states_equal_the_text_tower(clip):
    import torch

    from oodscope.vlm.anomalyclip import PromptLearner

    prompts = ["a cat is object.", "a cat is damaged object."]
    ids = torch.as_tensor(clip.tokenize(prompts)["input_ids"])
    learner = PromptLearner(clip.token_width, 4, 2, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = clip.model.text_model(input_ids=ids, output_hidden_states=True).hidden_states
        learner.ctx.copy_(clip.token_embeddings(ids[:, 1:5]))  # "a cat is " as both contexts
        learner.deep.copy_(hidden[1][0, 1:3][None])  # block 1's own input at positions 1, 2 (the same in both)
        out = learner(clip, ids)
    np.testing.assert_allclose(out.numpy(), _unit(clip.encode_texts(prompts)), rtol=1e-4, atol=1e-5)


def test_anomalyclip_trains_the_prompts_only_and_scores_by_hand(clip):
    import torch

    from oodscope.vlm.anomalyclip import dpam_features
    from oodscope.imagead.base import gaussian_blur
    from vlm_models import tiny_mvtec_folder

    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    detector = oodscope.create("anomalyclip", model=clip, auxiliary=str(tiny_mvtec_folder()), n_ctx=4, depth=2,
                               t_n_ctx=2, layers=(1, 2), dpam_depth=1, epochs=6, batch_size=4)
    rng = np.random.default_rng(4)
    detector.fit(rng.random((2, 3, 40, 40)).astype(np.float32))
    assert all(torch.equal(before[k], v) for k, v in clip.model.state_dict().items())
    assert detector.history_[-1] < detector.history_[0]
    test = rng.random((3, 3, 40, 40)).astype(np.float32)
    scores, maps = detector.score_and_map(test)
    texts = detector.text_embeddings_
    with torch.no_grad():
        g, patches = dpam_features(clip, clip.preprocess(torch.from_numpy(test)), (1, 2), 1)
    np.testing.assert_allclose(scores, _softmax(_unit(g.numpy()) @ texts.T / 0.07)[:, 1], rtol=1e-5)
    total = 0
    for p in patches:
        s = _softmax(_unit(p.numpy()) @ texts.T / 0.07)  # (N, 16, 2)
        s = torch.from_numpy(s.transpose(0, 2, 1).reshape(3, 2, 4, 4))
        s = torch.nn.functional.interpolate(s, size=(32, 32), mode="bilinear", align_corners=False)
        total = total + (s[:, 1] + 1 - s[:, 0]) / 2
    full = torch.nn.functional.interpolate(total[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(maps, gaussian_blur(full, 4.0).numpy(), rtol=1e-5, atol=1e-6)


def test_anomalyclip_refuses_a_missing_or_unannotated_auxiliary_set(clip, images):
    with pytest.raises(ValueError, match="pass auxiliary="):
        oodscope.create("anomalyclip", model=clip).fit(images)
    with pytest.raises(ValueError, match="model has 2 vision blocks"):
        oodscope.create("anomalyclip", model=clip, auxiliary="x").fit(images)


# -- Hugging Face model ids from the local cache ---------------------------------------------------------------
def _cache_layout(cache, model_id, revision="0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout: ``models--ORG--NAME/snapshots/<revision>/`` (the files) and
    ``refs/main`` (the revision)."""
    entry = cache / f"models--{model_id.replace('/', '--')}"
    save_tiny_clip(entry / "snapshots" / revision)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    return entry / "snapshots" / revision


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_model_id_loads_offline_from_the_hugging_face_cache(tmp_path, monkeypatch, images, variable):
    from oodscope.vlm.backbone import hub_cache_dir

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "hf"
    monkeypatch.setenv(variable, str(root))
    cache = root if variable == "HF_HUB_CACHE" else root / "hub"
    assert hub_cache_dir() == cache
    snapshot = _cache_layout(cache, "testorg/tiny-clip")
    monkeypatch.chdir(tmp_path)  # no folder named like the id next to us
    by_id = load_clip("testorg/tiny-clip", use_cache=False)
    by_folder = load_clip(snapshot, use_cache=False)
    np.testing.assert_array_equal(by_id.encode_images(images)[0], by_folder.encode_images(images)[0])
    text = ["a photo of a sky."]
    np.testing.assert_array_equal(by_id.encode_texts(text), by_folder.encode_texts(text))
    mcm = oodscope.create("mcm", model="testorg/tiny-clip").fit(CLASSES)  # a detector's model= takes the id too
    np.testing.assert_allclose(mcm.score(images), oodscope.create("mcm", model=by_folder).fit(CLASSES).score(images))
    import re

    with pytest.raises(ValueError, match=re.escape(f"'testorg/absent' is neither a local folder nor in the Hugging "
                                                   f"Face cache {cache}")):
        load_clip("testorg/absent")
    with pytest.raises(ValueError, match="is not a folder"):
        load_clip("../not/an/id")
