"""CLIP-AD (SDP) and FiLo (training-free) on tiny CLIP models whose weights the tests create (no real CLIP weights).

Each score and map is checked against a hand-written computation on the same embeddings (the dual paths rebuilt
from the block weights in numpy, feature surgery and the maps by explicit loops), and a tiny CLIP whose visual
projection is solved to send grey patches to the normal and white patches to the anomalous text vector (aligned by
construction) checks that a planted white patch gives the map's peak.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import oodscope  # noqa: E402
from oodscope.vlm.clip_ad import (ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, feature_surgery,  # noqa: E402
                                  minmax_fusion, representative_vector, staged_dual_path)
from oodscope.vlm.filo import (DESCRIPTIONS, POSITIONS, anomalous_states, position_prompts,  # noqa: E402
                               small_gaussian_blur)
from oodscope.vlm import winclip  # noqa: E402
from vlm_models import AlignedClip, tiny_clip  # noqa: E402


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
    return np.random.default_rng(0).random((5, 3, 32, 32)).astype(np.float32)


def _hidden(clip, images):
    with torch.no_grad():
        pixels = clip.preprocess(torch.from_numpy(images))
        return pixels, clip.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states


def _vv_by_hand(clip, block, h):
    """A block's V-V attention output on the hidden state ``h`` entering it, in numpy from the block's weights."""
    w = {k: v.double().numpy() for k, v in block.state_dict().items()}
    h = h.double().numpy()
    x = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * w["layer_norm1.weight"] + \
        w["layer_norm1.bias"]
    v = x @ w["self_attn.v_proj.weight"].T + w["self_attn.v_proj.bias"]
    heads = clip.model.config.vision_config.num_attention_heads
    vh = v.reshape(len(v), v.shape[1], heads, -1).transpose(0, 2, 1, 3)
    attention = _softmax(vh @ vh.transpose(0, 1, 3, 2) * vh.shape[-1] ** -0.5)
    out = (attention @ vh).transpose(0, 2, 1, 3).reshape(v.shape)
    return out @ w["self_attn.out_proj.weight"].T + w["self_attn.out_proj.bias"]


# -- CLIP-AD ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stages", [1, 2])
def test_staged_dual_path_by_hand(clip, images, stages):
    """The new path restarts at each stage and sums the stage's V-V outputs; the class token is the original path's."""
    pixels, hidden = _hidden(clip, images)
    blocks = clip.model.vision_model.encoder.layers
    vv = [_vv_by_hand(clip, blocks[i], hidden[i]) for i in range(2)]
    new = [vv[0], vv[1] if stages == 2 else vv[0] + vv[1]]  # 2 stages: each block alone; 1 stage: accumulated
    with torch.no_grad():
        global_, features, hidden_states = staged_dual_path(clip, pixels, (1, 2), stages)
        for layer in (1, 2):
            tokens = np.concatenate([hidden[layer][:, :1].double().numpy(), new[layer - 1][:, 1:]], axis=1)
            expected = clip._project(torch.from_numpy(tokens).float()).numpy()
            np.testing.assert_allclose(features[layer - 1].numpy(), expected, rtol=1e-4, atol=1e-5)
        for layer in (1, 2):  # the original path is CLIP's own
            np.testing.assert_allclose(hidden_states[layer - 1].numpy(), hidden[layer].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(global_.numpy(), clip.encode_images(images, patches=False)[0], rtol=1e-4, atol=1e-5)


def test_feature_surgery_by_hand():
    rng = np.random.default_rng(1)
    layers = [_unit(rng.normal(size=(2, 5, 6))) for _ in range(3)]
    texts = _unit(rng.normal(size=(3, 6)))
    expected = np.zeros((2, 5, 3))
    for f in layers:
        for n in range(2):
            p = _softmax(f[n, 0] @ texts.T)
            w = p / p.mean()
            for i in range(5):
                weighted = [w[t] * float(f[n, i] @ texts[t]) for t in range(3)]
                expected[n, i] += np.array(weighted) - np.mean(weighted)
    np.testing.assert_allclose(feature_surgery(layers, texts), expected, rtol=1e-12, atol=1e-14)
    two = feature_surgery(layers[:1], texts[:2])  # two texts: s_a = (w_a cos_a - w_n cos_n) / 2 = -s_n
    np.testing.assert_allclose(two[..., 1], -two[..., 0], rtol=1e-12)


def test_representative_vectors_mean_and_dbscan():
    rng = np.random.default_rng(2)
    centre, other = _unit(rng.normal(size=8)), _unit(rng.normal(size=8))
    cluster = _unit(centre + 0.02 * rng.normal(size=(20, 8)))
    minor = _unit(other + 0.02 * rng.normal(size=(6, 8)))
    stray = _unit(rng.normal(size=(3, 8)))
    data = np.concatenate([cluster, minor, stray])
    np.testing.assert_allclose(representative_vector(data, "mean"), _unit(data.mean(axis=0)), rtol=1e-12)
    np.testing.assert_allclose(representative_vector(data, "dbscan", eps=0.2, min_samples=5),
                               _unit(cluster.mean(axis=0)), rtol=1e-12)  # the largest cluster only
    with pytest.raises(ValueError, match="finds no cluster"):
        representative_vector(stray, "dbscan", eps=0.01, min_samples=3)


def _clip_ad_texts(clip, object_name):
    vectors = []
    for states in (NORMAL_STATES, ANOMALOUS_STATES):
        prompts = [t.format(s.format(object_name)) for s in states for t in TEMPLATES]
        vectors.append(_unit(_unit(clip.encode_texts(prompts)).mean(axis=0)))
    return np.stack(vectors)


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_clip_ad_scores_and_map_by_hand(clip, sigma):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    train, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((3, 3, 32, 32)).astype(np.float32)
    detector = oodscope.create("clip_ad", model=clip, object_name="bottle", stages=2, sigma=sigma).fit(train)
    texts = _clip_ad_texts(clip, "bottle")
    np.testing.assert_allclose(detector.text_embeddings_, texts, rtol=1e-6, atol=1e-7)
    assert detector.layers_ == (1, 2) and len(NORMAL_STATES) == 9 and len(ANOMALOUS_STATES) == 10
    assert len(TEMPLATES) == 22
    with torch.no_grad():
        _, features, _ = staged_dual_path(clip, clip.preprocess(torch.from_numpy(test)), (1, 2), 2)
    grid = np.zeros((3, 16))
    for f in features:
        f = _unit(f.numpy())
        for n in range(3):
            p = _softmax(f[n, 0] @ texts.T)
            w = p / p.mean()
            for i in range(16):
                a, b = w[1] * float(f[n, 1 + i] @ texts[1]), w[0] * float(f[n, 1 + i] @ texts[0])
                grid[n, i] += a - (a + b) / 2
    full = torch.nn.functional.interpolate(torch.from_numpy(grid.reshape(3, 1, 4, 4)), size=(32, 32),
                                           mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma:
        full = np.stack([gaussian_filter(m, sigma=sigma) for m in full])  # scipy's defaults, as the authors
    image = _unit(clip.encode_images(test, patches=False)[0])
    scores, maps = detector.score_and_map(test)
    np.testing.assert_allclose(scores, _softmax(100.0 * image @ texts.T)[:, 1], rtol=1e-5)
    np.testing.assert_allclose(maps, full, rtol=1e-5, atol=1e-7)
    p_a, peak = detector.score_parts(test)
    np.testing.assert_array_equal(p_a, scores)
    np.testing.assert_allclose(peak, full.reshape(3, -1).max(axis=1), rtol=1e-5)
    by_map = oodscope.create("clip_ad", model=clip, object_name="bottle", stages=2, sigma=sigma,
                             image_score="map_max").fit(train)
    np.testing.assert_allclose(by_map.score(test), peak, rtol=1e-12)
    fused = minmax_fusion(p_a, peak)
    np.testing.assert_allclose(fused, (p_a - p_a.min()) / np.ptp(p_a) + (peak - peak.min()) / np.ptp(peak))


def test_clip_ad_default_layers_are_the_stage_ends_and_bad_settings_are_refused(clip, images):
    assert oodscope.create("clip_ad", model=clip, stages=1).fit(images).layers_ == (2,)
    assert oodscope.create("clip_ad", model=clip, stages=2).fit(images).layers_ == (1, 2)
    with pytest.raises(ValueError, match="stages=4 does not divide the model's 2 vision blocks"):
        oodscope.create("clip_ad", model=clip).fit(images)
    with pytest.raises(ValueError, match="layers must be distinct block numbers in 1..2"):
        oodscope.create("clip_ad", model=clip, stages=2, layers=(1, 3)).fit(images)
    with pytest.raises(ValueError, match="representative must be one of"):
        oodscope.create("clip_ad", model=clip, stages=2, representative="kde").fit(images)
    with pytest.raises(ValueError, match="image_score must be one of"):
        oodscope.create("clip_ad", model=clip, stages=2, image_score="sum").fit(images)
    with pytest.raises(ValueError, match="object_name must be a non-empty string"):
        oodscope.create("clip_ad", model=clip, stages=2, object_name=" ").fit(images)
    with pytest.raises(ValueError, match="exposes no vision blocks"):
        oodscope.create("clip_ad", model=AlignedClip(), stages=2).fit(images)
    with pytest.raises(ValueError, match="finds no cluster"):
        oodscope.create("clip_ad", model=clip, stages=2, representative="dbscan", dbscan_eps=1e-6).fit(images)
    with pytest.raises(ValueError, match="constant over the test set"):
        minmax_fusion(np.ones(3), np.arange(3.0))


def test_clip_ad_plus_trains_the_linear_layers_only_and_adds_their_maps(clip):
    from scipy.ndimage import gaussian_filter

    from oodscope.vlm.clip_ad import plus_maps
    from vlm_models import tiny_mvtec_folder

    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    params = dict(model=clip, auxiliary=str(tiny_mvtec_folder()), stages=2, epochs=6, batch_size=4, lr=1e-2,
                  sigma=2.0, seed=3)
    rng = np.random.default_rng(9)
    train, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((3, 3, 32, 32)).astype(np.float32)
    plus = oodscope.create("clip_ad_plus", **params).fit(train)
    assert all(torch.equal(before[k], v) for k, v in clip.model.state_dict().items())  # CLIP stays frozen
    assert plus.history_[-1] < plus.history_[0] and plus.adapter_shape_ == (2, 32, 16)
    again = oodscope.create("clip_ad_plus", **params).fit(train)
    for a, b in zip(plus.adapters_.parameters(), again.adapters_.parameters()):
        assert torch.equal(a, b)  # seeded
    sdp = oodscope.create("clip_ad", model=clip, stages=2, sigma=0.0).fit(train)
    sdp_scores, sdp_map = sdp.score_and_map(test)
    with torch.no_grad():
        _, _, hidden = staged_dual_path(clip, clip.preprocess(torch.from_numpy(test)), (1, 2), 2)
    texts = plus.text_embeddings_
    extra = np.zeros((3, 32, 32))
    for layer, h in enumerate(hidden):
        w, b = (t.double().numpy() for t in (plus.adapters_[layer].weight, plus.adapters_[layer].bias))
        f = _unit(h[:, 1:].double().numpy() @ w.T + b)
        logits = torch.from_numpy((100.0 * f @ texts.T).transpose(0, 2, 1).reshape(3, 2, 4, 4))
        up = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=True).numpy()
        extra += _softmax(up.transpose(0, 2, 3, 1))[..., 1]
    with torch.no_grad():
        maps = plus_maps(plus.adapters_, [h.float() for h in hidden], torch.from_numpy(texts).float(), (4, 4), 32)
    np.testing.assert_allclose(sum(m[:, 1] for m in maps).numpy(), extra, rtol=1e-4, atol=1e-5)
    scores, full = plus.score_and_map(test)
    np.testing.assert_allclose(scores, sdp_scores, rtol=1e-12)  # SDP's image score
    expected = np.stack([gaussian_filter(m, sigma=2.0) for m in sdp_map + extra])
    np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pass auxiliary="):
        oodscope.create("clip_ad_plus", model=clip, stages=2).fit(train)


# -- FiLo -------------------------------------------------------------------------------------------------------
def test_filo_prompts_descriptions_and_positions():
    assert len(DESCRIPTIONS) == 27 and DESCRIPTIONS["bottle"][:2] == ("a broken rim", "a crack in the glass")
    states = anomalous_states(["crack", "hole"])
    assert states[:2] == ["abnormal {} with crack", "abnormal {} with hole"]
    assert states[2:] == list(winclip.ANOMALOUS_STATES)
    prompts = position_prompts(states[:1], "bottle", ("top left", "center"), ("a photo of a {}.", "{}"))
    assert prompts == ["a photo of a abnormal bottle with crack at top left.", "abnormal bottle with crack at top left",
                       "a photo of a abnormal bottle with crack at center.", "abnormal bottle with crack at center"]
    assert len(POSITIONS) == 9


def test_small_gaussian_blur_is_torchvisions_3_tap_kernel():
    rng = np.random.default_rng(4)
    maps = rng.random((2, 6, 7))
    taps = np.exp(-0.5 * (np.array([-1.0, 0.0, 1.0]) / 4.0) ** 2)
    taps /= taps.sum()
    padded = np.pad(maps, ((0, 0), (1, 1), (1, 1)), mode="reflect")  # numpy's reflect = torch's (edge not repeated)
    expected = sum(taps[a] * taps[b] * padded[:, a:a + 6, b:b + 7] for a in range(3) for b in range(3))
    np.testing.assert_allclose(small_gaussian_blur(torch.from_numpy(maps)).numpy(), expected, rtol=1e-12)


def _filo_texts(clip, name, descriptions, positions):
    normal = [t.format(s.format(name)) for s in winclip.NORMAL_STATES for t in winclip.TEMPLATES]
    states = [f"abnormal {{}} with {d}" for d in descriptions] + list(winclip.ANOMALOUS_STATES)
    anomalous = [t.format(f"{s.format(name)} at {p}") for s in states for p in positions for t in winclip.TEMPLATES]
    return np.stack([_unit(_unit(clip.encode_texts(prompts)).mean(axis=0)) for prompts in (normal, anomalous)])


def test_filo_scores_and_map_by_hand(clip):
    from oodscope.vlm.anomalyclip import dpam_features

    rng = np.random.default_rng(5)
    train, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((3, 3, 32, 32)).astype(np.float32)
    detector = oodscope.create("filo", model=clip, object_name="pcb3", positions=("top", "center"), layers=(1, 2),
                               dpam_depth=1).fit(train)
    texts = _filo_texts(clip, "pcb", DESCRIPTIONS["pcb3"], ("top", "center"))  # pcb3 is prompted as "pcb"
    np.testing.assert_allclose(detector.text_embeddings_, texts, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        global_, patches = dpam_features(clip, clip.preprocess(torch.from_numpy(test)), (1, 2), 1)
    layer_maps = []
    for p in patches:
        logits = 100.0 / np.sqrt(2.0) * _unit(p.numpy()) @ texts.T  # (3, 16, 2)
        logits = torch.from_numpy(logits.transpose(0, 2, 1).reshape(3, 2, 4, 4))
        s = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=True).numpy()
        s = _softmax(s.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        layer_maps.append(small_gaussian_blur(torch.from_numpy((s[:, 1] - s[:, 0] + 1) / 2)).numpy())
    expected_map = np.mean(layer_maps, axis=0)
    p_a = _softmax(_unit(global_.numpy()) @ texts.T / 0.07)[:, 1]
    scores, maps = detector.score_and_map(test)
    np.testing.assert_allclose(maps, expected_map, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores, (p_a + expected_map.reshape(3, -1).max(axis=1)) / 2, rtol=1e-5)


def test_filo_positions_default_to_all_nine_and_bad_prompt_lists_are_refused(clip, images):
    every = oodscope.create("filo", model=clip, descriptions=["crack"], layers=(1, 2)).fit(images)
    np.testing.assert_allclose(every.text_embeddings_, _filo_texts(clip, "object", ["crack"], POSITIONS),
                               rtol=1e-6, atol=1e-7)
    assert every.dpam_depth_ == 0  # all blocks but the first 6: none of the tiny model's 2
    with pytest.raises(ValueError, match="no built-in fine-grained descriptions for object_name 'object'"):
        oodscope.create("filo", model=clip, layers=(1, 2)).fit(images)
    with pytest.raises(ValueError, match="descriptions is empty"):
        oodscope.create("filo", model=clip, descriptions=[], layers=(1, 2)).fit(images)
    with pytest.raises(ValueError, match="non-empty strings"):
        oodscope.create("filo", model=clip, descriptions=["crack", ""], layers=(1, 2)).fit(images)
    with pytest.raises(ValueError, match="not one string"):
        oodscope.create("filo", model=clip, descriptions="crack", layers=(1, 2)).fit(images)
    with pytest.raises(ValueError, match="positions must be a non-empty list"):
        oodscope.create("filo", model=clip, object_name="bottle", positions=["middle"], layers=(1, 2)).fit(images)
    with pytest.raises(ValueError, match="positions must be a non-empty list"):
        oodscope.create("filo", model=clip, object_name="bottle", positions=[], layers=(1, 2)).fit(images)
    with pytest.raises(ValueError, match="model has 2 vision blocks"):
        oodscope.create("filo", model=clip, object_name="bottle").fit(images)  # default layers 6..24: ViT-L/14's
    assert oodscope.create("filo", model=clip, object_name="metal_nut", layers=(1, 2)).fit(images)._prompt_name() \
        == "metal nut"


# -- both: bad images, batch independence, the planted patch ----------------------------------------------------
@pytest.mark.parametrize("name, params", [("clip_ad", {"stages": 2}),
                                          ("filo", {"object_name": "bottle", "layers": (1, 2), "dpam_depth": 1})])
def test_bad_images_are_refused(clip, images, name, params):
    detector = oodscope.create(name, model=clip, **params)
    with pytest.raises(oodscope.NotFittedError):
        detector.score(images)
    with pytest.raises(ValueError, match="square"):
        detector.fit(images[:, :, :, :30])
    detector.fit(images)
    bad = images.copy()
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detector.score(bad)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        detector.score(images[:, :2])
    with pytest.raises(ValueError, match="detector was fitted on"):
        detector.score(images[:, :, :24, :24])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        detector.score(images * 255)
    with pytest.raises(ValueError, match="no CLIP model"):
        oodscope.create(name, **params).fit(images)


@pytest.mark.parametrize("name, params", [("clip_ad", {"stages": 2}),
                                          ("filo", {"object_name": "bottle", "layers": (1, 2), "dpam_depth": 1})])
def test_a_subset_in_other_batches_gets_the_same_scores_and_maps(name, params):
    small = tiny_clip(batch_size=3)  # 7 images: batches of 3, 3 and 1 (filled to 3)
    rng = np.random.default_rng(6)
    train, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((7, 3, 32, 32)).astype(np.float32)
    detector = oodscope.create(name, model=small, **params).fit(train)
    scores, maps = detector.score_and_map(test)
    index = np.array([6, 0, 3, 4])
    sub_scores, sub_maps = detector.score_and_map(test[index])
    np.testing.assert_allclose(sub_scores, scores[index], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sub_maps, maps[index], rtol=1e-9, atol=1e-12)


def _aligned_tiny_clip(texts: np.ndarray, feature_fn, patch=(0, 2)):
    """A fresh tiny CLIP whose visual projection is solved (least squares) so that the post-norm patch tokens of
    ``feature_fn`` for grey patches map to the direction ``g_n - g_a`` and for a white patch to ``g_a - g_n`` (the
    normal and anomalous text vectors ``texts``, which a random text tower puts close together)."""
    clip = tiny_clip()
    vision = clip.model.vision_model
    with torch.no_grad():
        vision.embeddings.patch_embedding.weight.mul_(10.0)  # colour dominates the position embeddings
    grey = np.full((6, 3, 32, 32), 0.5, np.float32) + np.random.default_rng(7).normal(0, 0.01, (6, 3, 32, 32))
    white = grey.copy()
    top, left = 8 * patch[0], 8 * patch[1]
    white[:, :, top:top + 8, left:left + 8] = 1.0
    data = np.clip(np.concatenate([grey, white]), 0, 1).astype(np.float32)
    projection = clip.model.visual_projection
    clip.model.visual_projection = torch.nn.Identity()
    try:
        with torch.no_grad():
            tokens = [t.double().numpy() for t in feature_fn(clip, clip.preprocess(torch.from_numpy(data)))]
    finally:
        clip.model.visual_projection = projection
    is_white = np.zeros((12, 16), bool)
    is_white[6:, 4 * patch[0] + patch[1]] = True
    x = np.concatenate([t.reshape(-1, t.shape[-1]) for t in tokens])
    towards = _unit(texts[1] - texts[0])
    y = np.where(np.tile(is_white.reshape(-1), len(tokens))[:, None], towards, -towards)
    solution = np.linalg.lstsq(x, y, rcond=None)[0]  # (width, D)
    with torch.no_grad():
        projection.weight.copy_(torch.from_numpy(solution.T).float())
    return clip, grey, white


@pytest.mark.parametrize("name, params", [("clip_ad", {"stages": 2, "sigma": 2.0}),
                                          ("filo", {"object_name": "bottle", "layers": (1, 2), "dpam_depth": 1})])
def test_aligned_tiny_clip_map_peaks_on_the_planted_patch(name, params):
    from oodscope.vlm.anomalyclip import dpam_features

    texts = oodscope.create(name, model=tiny_clip(), **params).fit(
        np.random.default_rng(8).random((2, 3, 32, 32)).astype(np.float32)).text_embeddings_
    if name == "clip_ad":
        def feature_fn(c, pixels):
            return [f[:, 1:] for f in staged_dual_path(c, pixels, (1, 2), 2)[1]]  # patch tokens
    else:
        def feature_fn(c, pixels):
            return dpam_features(c, pixels, (1, 2), 1)[1]  # patch tokens only
    aligned, grey, white = _aligned_tiny_clip(texts, feature_fn)
    detector = oodscope.create(name, model=aligned, **params).fit(grey)
    _, maps = detector.score_and_map(np.concatenate([grey[:3], white[:3]]).astype(np.float32))
    for m in maps[3:]:
        row, col = np.unravel_index(m.argmax(), m.shape)
        assert 0 <= row < 8 and 16 <= col < 24  # inside the planted patch (row 0, column 2 of the 4 x 4 grid)
    assert maps[3:, 0:8, 16:24].mean() > maps[:3, 0:8, 16:24].mean()


def test_oodscope_ad_runs_clip_ad_and_filo_from_a_clip_folder(tmp_path):
    import json

    from oodscope.cli import main
    from vlm_models import tiny_clip_folder, tiny_grounding_folder, tiny_mvtec_folder

    model = json.dumps(str(tiny_clip_folder()))
    out = tmp_path / "out"
    assert main(["ad", str(tiny_mvtec_folder()), "--detectors", "clip_ad,filo", "--size", "32", "--out", str(out),
                 "--param", f"clip_ad.model={model}", "--param", "clip_ad.stages=2",
                 "--param", f"filo.model={model}", "--param", 'filo.object_name="tile"',
                 "--param", "filo.layers=[1, 2]",
                 "--param", f"filo.grounding={json.dumps(str(tiny_grounding_folder()))}"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert {r["detector"] for r in records} >= {"clip_ad", "filo"}


def test_oodscope_ad_runs_winclip_anomalyclip_clip_ad_plus_and_filo_trained_from_a_clip_folder(tmp_path):
    """Four other CLIP detectors end to end through ``oodscope ad`` (one run): image and pixel records for each,
    the trained ones on an auxiliary annotated MVTec-layout folder other than the target."""
    import json

    from oodscope.cli import main
    from vlm_models import tiny_clip_folder, tiny_mvtec_folder

    model = json.dumps(str(tiny_clip_folder()))
    auxiliary = json.dumps(str(tiny_mvtec_folder(n=3)))
    out = tmp_path / "out"
    assert main(["ad", str(tiny_mvtec_folder()), "--detectors", "winclip,anomalyclip,clip_ad_plus,filo_trained",
                 "--size", "32",
                 "--out", str(out),
                 "--param", f"winclip.model={model}", "--param", 'winclip.object_name="tile"',
                 "--param", f"anomalyclip.model={model}", "--param", f"anomalyclip.auxiliary={auxiliary}",
                 "--param", "anomalyclip.layers=[1, 2]", "--param", "anomalyclip.dpam_depth=1",
                 "--param", "anomalyclip.depth=2", "--param", "anomalyclip.n_ctx=4",
                 "--param", "anomalyclip.t_n_ctx=2",
                 "--param", "anomalyclip.epochs=1", "--param", "anomalyclip.batch_size=4",
                 "--param", f"clip_ad_plus.model={model}", "--param", f"clip_ad_plus.auxiliary={auxiliary}",
                 "--param", "clip_ad_plus.stages=2", "--param", "clip_ad_plus.epochs=1",
                 "--param", "clip_ad_plus.batch_size=4",
                 "--param", f"filo_trained.model={model}", "--param", f"filo_trained.auxiliary={auxiliary}",
                 "--param", 'filo_trained.descriptions=["crack"]', "--param", "filo_trained.layers=[1, 2]",
                 "--param", "filo_trained.dpam_depth=1", "--param", "filo_trained.n_ctx=2",
                 "--param", "filo_trained.epochs=1", "--param", "filo_trained.adapter_epochs=1",
                 "--param", "filo_trained.batch_size=4"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    for name in ("winclip", "anomalyclip", "clip_ad_plus", "filo_trained"):
        mine = [r for r in records if r["detector"] == name]
        assert mine, name
        for record in mine:  # an image AUROC and a pixel AUROC (the anomaly map) per defect group
            assert 0 <= record["auroc"] <= 100 and 0 <= record["pixel_auroc"] <= 100, (name, record)


# -- FiLo's trained parts ---------------------------------------------------------------------------------------
FILO_TRAINED = dict(object_name="bottle", descriptions=["crack"], positions=("top", "center"), layers=(1, 2),
                    dpam_depth=1, n_ctx=2, epochs=3, adapter_epochs=2, batch_size=4, lr=1e-2, decoder_lr=5e-3,
                    adapter_lr=1e-2, seed=2)


@pytest.fixture(scope="module")
def filo_auxiliary():
    from vlm_models import tiny_mvtec_folder

    return str(tiny_mvtec_folder())


def _conv_same(x, weight, bias):
    """``(C_in, H, W)`` cross-correlated with ``(C_out, C_in, kh, kw)``, zero padding to the same size."""
    kh, kw = weight.shape[2:]
    padded = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    out = np.zeros((weight.shape[0],) + x.shape[1:]) + bias[:, None, None]
    for dy in range(kh):
        for dx in range(kw):
            out += np.einsum("oc,chw->ohw", weight[:, :, dy, dx], padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]])
    return out


def test_filo_trained_scores_and_map_by_hand(clip, filo_auxiliary):
    """The trained networks applied by hand: the adapter, the meta-net-shifted contexts, the prompts' pair, the
    linear and six-kernel decoders, the per-layer softmax maps, their blurred mean and ``(<f', g_a> + max) / 2``."""
    from oodscope.vlm.anomalyclip import dual_path_tokens
    from oodscope.vlm.filo import small_gaussian_blur

    rng = np.random.default_rng(5)
    train, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((2, 3, 32, 32)).astype(np.float32)
    detector = oodscope.create("filo_trained", model=clip, auxiliary=filo_auxiliary, **FILO_TRAINED).fit(train)
    nets = detector.networks_
    assert detector.network_shape_ == (32, 32, 16, 2, 2, 1)  # width, token width, D, n_ctx, Q-K layers, V-V layers
    w = {k: v.double().numpy() for k, v in nets.state_dict().items()}
    normal = [f"x x {s.format('bottle')}." for s in winclip.NORMAL_STATES]
    anomalous = [f"x x {s.format('bottle')} at {p}." for s in ["abnormal {} with crack", *winclip.ANOMALOUS_STATES]
                 for p in ("top", "center")]
    ids = [torch.as_tensor(clip.tokenize(prompts)["input_ids"]) for prompts in (normal, anomalous)]
    with torch.no_grad():
        global_, vv, qk = dual_path_tokens(clip, clip.preprocess(torch.from_numpy(test)), (1, 2), 1)
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    scores, maps = detector.score_and_map(test)
    for i in range(2):
        f = _unit(global_[i].double().numpy())
        f = _unit(f + silu(w["adapter.fc.2.weight"] @ np.maximum(w["adapter.fc.0.weight"] @ f, 0)))
        pair = []
        for which, prompt_ids in (("normal", ids[0]), ("anomalous", ids[1])):
            shift = w[f"{which}.meta_net.2.weight"] @ np.maximum(w[f"{which}.meta_net.0.weight"] @ f +
                                                                 w[f"{which}.meta_net.0.bias"], 0)
            context = torch.from_numpy(w[f"{which}.context"] + shift + w[f"{which}.meta_net.2.bias"]).float()
            with torch.no_grad():
                texts = _unit(clip.context_text_forward(prompt_ids, context).double().numpy())
            pair.append(_unit(texts.mean(axis=0)))
        texts = np.stack(pair) / np.sqrt(2.0)
        decoded = [qk[j][i].double().numpy() @ w[f"linear.{j}.weight"].T + w[f"linear.{j}.bias"] for j in range(2)]
        grid = vv[1][i].double().numpy().T.reshape(32, 4, 4)  # V-V tokens of block 2, the dual one
        conv = sum(_conv_same(grid, w[f"conv.0.convs.{k}.weight"], w[f"conv.0.convs.{k}.bias"]) for k in range(6))
        decoded.append(conv.reshape(16, 16).T)
        layer_maps = []
        for d in decoded:
            logits = torch.from_numpy((100.0 * _unit(d) @ texts.T).T.reshape(1, 2, 4, 4))
            up = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=True).numpy()
            s = _softmax(up.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
            layer_maps.append(small_gaussian_blur(torch.from_numpy((s[:, 1] - s[:, 0] + 1) / 2)).numpy()[0])
        expected = np.mean(layer_maps, axis=0)
        np.testing.assert_allclose(maps[i], expected, rtol=1e-4, atol=1e-5)
        assert scores[i] == pytest.approx((f @ texts[1] + expected.max()) / 2, rel=1e-4)


def test_filo_trained_keeps_clip_frozen_is_seeded_and_its_adapter_stage_trains_only_the_adapter(clip,
                                                                                                  filo_auxiliary):
    rng = np.random.default_rng(6)
    train = rng.random((2, 3, 32, 32)).astype(np.float32)
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    trained = oodscope.create("filo_trained", model=clip, auxiliary=filo_auxiliary, **FILO_TRAINED).fit(train)
    assert all(torch.equal(before[k], v) for k, v in clip.model.state_dict().items())
    assert trained.history_[-1] < trained.history_[0] and len(trained.adapter_history_) == 2
    again = oodscope.create("filo_trained", model=clip, auxiliary=filo_auxiliary, **FILO_TRAINED).fit(train)
    no_adapter = oodscope.create("filo_trained", model=clip, auxiliary=filo_auxiliary,
                                 **{**FILO_TRAINED, "adapter_epochs": 0}).fit(train)
    for (name, a), b, c in zip(trained.networks_.state_dict().items(), again.networks_.state_dict().values(),
                               no_adapter.networks_.state_dict().values()):
        assert torch.equal(a, b)  # seeded
        assert torch.equal(a, c) != name.startswith("adapter.")  # stage 2 moves the adapter and nothing else
    assert no_adapter.history_ == trained.history_


def test_filo_trained_resumes_an_interrupted_fit_and_refuses_bad_settings(clip, filo_auxiliary, tmp_path,
                                                                          monkeypatch):
    import oodscope.vlm.anomalyclip as anomalyclip

    rng = np.random.default_rng(7)
    train = rng.random((2, 3, 32, 32)).astype(np.float32)
    settings = dict(model=clip, auxiliary=filo_auxiliary, **FILO_TRAINED)
    whole = oodscope.create("filo_trained", **settings).fit(train)
    real_focal, calls = anomalyclip.focal_loss, []
    steps_per_epoch = -(-8 // FILO_TRAINED["batch_size"])  # 8 auxiliary images

    def dies_in_epoch_3(*args):
        calls.append(1)
        if len(calls) > 2 * steps_per_epoch * 4 * 3:  # images per batch x maps per image
            raise KeyboardInterrupt
        return real_focal(*args)

    checkpoint = str(tmp_path / "filo.pt")
    monkeypatch.setattr(anomalyclip, "focal_loss", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        oodscope.create("filo_trained", checkpoint=checkpoint, **settings).fit(train)
    monkeypatch.setattr(anomalyclip, "focal_loss", real_focal)
    resumed = oodscope.create("filo_trained", checkpoint=checkpoint, **settings).fit(train)
    assert resumed.history_ == whole.history_ and resumed.adapter_history_ == whole.adapter_history_
    for a, b in zip(resumed.networks_.state_dict().values(), whole.networks_.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="belongs to another fit"):
        oodscope.create("filo_trained", checkpoint=checkpoint, **{**settings, "seed": 5}).fit(train)
    # the training prompts name the auxiliary set's own category (the authors' per-image class prompts)
    from oodscope.vlm.filo import DESCRIPTIONS as BUILT_IN

    detector = oodscope.create("filo_trained", **settings)
    assert detector._auxiliary_prompts() == ("tile", list(BUILT_IN["tile"]))  # the folder's name
    assert oodscope.create("filo_trained", **{**settings, "auxiliary_object": "pcb1"})._auxiliary_prompts() == \
        ("pcb", list(BUILT_IN["pcb1"]))
    assert oodscope.create("filo_trained", **{**settings, "auxiliary": ["images"]})._auxiliary_prompts() == \
        ("bottle", ["crack"])  # not a folder: the target's own prompts
    for bad, message in (({"auxiliary": None}, "pass auxiliary="), ({"adapter_epochs": -1}, "adapter_epochs"),
                         ({"auxiliary_object": "teapot"}, "auxiliary_object 'teapot' has no built-in"),
                         ({"decoder_lr": 0.0}, "decoder_lr must be > 0"), ({"n_ctx": 0}, "n_ctx must be")):
        with pytest.raises(ValueError, match=message):
            oodscope.create("filo_trained", **{**settings, **bad}).fit(train)
