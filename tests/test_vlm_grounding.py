"""FiLo's HQ-Loc: Grounding DINO boxes, the position word and the map outside the boxes (no real weights needed).

The box rules are checked by hand on planted detections and against transformers' own
``post_process_grounded_object_detection`` on a tiny random Grounding DINO; FiLo with boxes is checked against FiLo
without them at the position the boxes choose (that path is itself checked by hand in test_vlm_clipad_filo.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import oodscope  # noqa: E402
from oodscope.vlm.grounding import (GENERAL_WORDS, Detections, GroundingDino, anomaly_caption,  # noqa: E402
                                    load_grounding_dino, position_of, select_boxes, weight_outside)
from vlm_models import tiny_clip, tiny_clip_folder, tiny_grounding_folder  # noqa: E402


@pytest.fixture(scope="module")
def grounding():
    return load_grounding_dino(tiny_grounding_folder(), size=64)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def _planted(grounding, caption, probs_by_word, boxes):
    """Detections whose query ``q`` gives the caption's token of word ``w`` the probability ``probs_by_word[q][w]``."""
    ids = np.asarray(grounding.tokenizer(caption)["input_ids"])
    vocab = grounding.tokenizer.get_vocab()
    probs = np.full((len(boxes), len(ids)), 0.01)
    for q, chosen in enumerate(probs_by_word):
        for word, p in chosen.items():
            probs[q, ids == vocab[word]] = p
    return Detections(np.asarray(boxes, dtype=np.float64), probs, ids)


def test_caption_is_the_general_words_and_descriptions_lower_cased():
    caption, words = anomaly_caption(["Crack", " hole "])
    assert caption == "anomaly . damage . broken . defect . contamination . crack . hole."
    assert words == list(GENERAL_WORDS) + ["crack", "hole"]  # matched against uncased phrases


def test_select_boxes_by_hand(grounding):
    caption, words = anomaly_caption(["crack"])
    boxes = [[0.5, 0.5, 0.2, 0.2],   # crack 0.9, small: kept, an anomaly box
             [0.5, 0.5, 0.9, 0.9],   # crack 0.95 but 81 % of the image: dropped by the area rule
             [0.2, 0.8, 0.1, 0.3],   # max 0.2: under the box threshold
             [0.7, 0.3, 0.2, 0.1]]   # "." only: kept by score, its phrase names no anomaly word
    detection = _planted(grounding, caption, [{"crack": 0.9}, {"crack": 0.95}, {"crack": 0.2}, {".": 0.6}], boxes)
    found, scores = select_boxes(grounding, detection, words)
    np.testing.assert_allclose(found, [[0.4, 0.4, 0.6, 0.6]])
    np.testing.assert_allclose(scores, [0.9])
    assert grounding.phrase(detection, 0, 0.25) == "crack"
    # nothing passes: the single query of highest probability is kept, whatever its area
    none = _planted(grounding, caption, [{"crack": 0.2}, {"crack": 0.1}, {"anomaly": 0.24}],
                    [boxes[2], boxes[3], [0.5, 0.4, 0.9, 0.8]])
    found, scores = select_boxes(grounding, none, words, text_threshold=0.2)
    np.testing.assert_allclose(found, [[0.05, 0.0, 0.95, 0.8]])  # the third query: 72 % of the image
    np.testing.assert_allclose(scores, [0.24])
    # the phrase holds the kept query's tokens over text_threshold only; none of them -> no anomaly box
    found, _ = select_boxes(grounding, none, words)
    assert found.shape == (0, 4)


def test_position_of_the_best_box_in_a_3_by_3_grid():
    boxes = np.array([[0.0, 0.0, 0.2, 0.2], [0.7, 0.4, 0.9, 0.6], [0.3, 0.8, 0.4, 1.0]])
    assert position_of(boxes, np.array([0.5, 0.9, 0.3])) == "right"
    assert position_of(boxes, np.array([0.9, 0.5, 0.3])) == "top left"
    assert position_of(boxes, np.array([0.9, 0.5, 0.9])) == "bottom"  # ties go to the later box, as the authors'
    assert position_of(np.zeros((0, 4)), np.zeros(0)) == "center"


def test_weight_outside_keeps_the_boxes_and_scales_the_rest():
    anomaly_map = torch.arange(1.0, 101.0, dtype=torch.float64).reshape(10, 10)
    out = weight_outside(anomaly_map, np.array([[0.1, 0.2, 0.35, 0.5], [0.8, 0.8, 1.2, 1.0]]), 0.7).numpy()
    inside = np.zeros((10, 10), dtype=bool)
    inside[2:5, 1:3] = True   # rows int(2.0)..int(5.0), columns int(1.0)..int(3.5)
    inside[8:10, 8:12] = True
    expected = np.where(inside, anomaly_map.numpy(), 0.7 * anomaly_map.numpy())
    np.testing.assert_allclose(out, expected)
    np.testing.assert_allclose(weight_outside(anomaly_map, np.zeros((0, 4)), 0.7).numpy(), 0.7 * anomaly_map.numpy())


def test_detections_equal_transformers_post_processing(grounding):
    """Scores, corner boxes and phrases of the queries over the threshold, against transformers' own rule run on
    the model's output for the same pixels and caption."""
    images = np.random.default_rng(0).random((2, 3, 32, 32)).astype(np.float32)
    caption, _ = anomaly_caption(["crack", "hole"])
    detections = grounding.detect(images, caption)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_grounding_folder(), local_files_only=True)
    tokens = processor.tokenizer([caption] * 2, return_tensors="pt")
    with torch.no_grad():
        pixels = grounding.pixels(torch.from_numpy(images))
        out = grounding.model(pixel_values=pixels, pixel_mask=torch.ones_like(pixels[:, 0], dtype=torch.long),
                              **tokens)
    results = processor.post_process_grounded_object_detection(out, tokens["input_ids"], threshold=0.5,
                                                               text_threshold=0.5)
    for detection, result in zip(detections, results):
        scores = detection.token_probs.max(axis=1)
        kept = np.flatnonzero(scores > 0.5)
        assert len(kept) == len(result["scores"]) > 0
        np.testing.assert_allclose(scores[kept], result["scores"].numpy(), rtol=1e-5)
        cx, cy, w, h = detection.boxes[kept].T
        np.testing.assert_allclose(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1),
                                   result["boxes"].numpy(), rtol=1e-5, atol=1e-6)
        assert [grounding.phrase(detection, q, 0.5) for q in kept] == list(result["text_labels"])


class PlantedGrounding(GroundingDino):
    """Grounding DINO stand-in whose detections are planted per image (the boxes' rules are tested above)."""

    def __init__(self, real: GroundingDino, planted: list[tuple[list[dict], list[list[float]]]]):
        super().__init__(real.model, real.tokenizer, real.mean, real.std, real.size)
        self.planted = planted

    def detect(self, images, caption, device="cpu"):
        assert len(images) == len(self.planted)
        return [_planted(self, caption, probs, boxes) for probs, boxes in self.planted]


PLANTED = [([{"crack": 0.9}], [[0.2, 0.2, 0.2, 0.2]]),                      # top left
           ([{"crack": 0.5}, {"hole": 0.8}], [[0.5, 0.5, 0.2, 0.2], [0.8, 0.5, 0.2, 0.4]]),  # right (best box)
           ([{".": 0.9}], [[0.5, 0.5, 0.2, 0.2]])]                           # no anomaly box: center, all x 0.7
CHOSEN = ["top left", "right", "center"]


@pytest.mark.parametrize("name", ["filo", "filo_trained"])
def test_filo_with_boxes_equals_filo_at_the_chosen_position_with_the_map_weighted(clip, grounding, name):
    from vlm_models import tiny_mvtec_folder

    rng = np.random.default_rng(3)
    train, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((3, 3, 32, 32)).astype(np.float32)
    params = dict(model=clip, descriptions=["crack", "hole"], layers=(1, 2), dpam_depth=1)
    if name == "filo_trained":
        params.update(auxiliary=str(tiny_mvtec_folder()), n_ctx=2, epochs=1, adapter_epochs=1, batch_size=4)
    located = oodscope.create(name, grounding=PlantedGrounding(grounding, PLANTED), **params).fit(train)
    scores, maps = located.score_and_map(test)
    assert located._locate(test)[0] == CHOSEN
    for i, (position, (_, boxes)) in enumerate(zip(CHOSEN, PLANTED)):
        if name == "filo":  # training-free: the same detector at the one position the boxes chose
            alone = oodscope.create(name, positions=[position], **params).fit(train)
        else:  # trained with all nine positions (as the authors), tested at the chosen one
            alone = copy.deepcopy(located)
            alone.set_params(grounding=None, positions=[position])
        expected_score, expected_map = alone.score_and_map(test[i:i + 1])
        np.testing.assert_allclose(scores[i], expected_score[0], rtol=1e-6)  # the score is taken before HQ-Loc
        anomaly = [b for b, p in zip(boxes, PLANTED[i][0]) if "." not in p]
        corners = np.array([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for cx, cy, w, h in anomaly])
        weighted = weight_outside(torch.from_numpy(expected_map[0]), corners.reshape(-1, 4), 0.7).numpy()
        np.testing.assert_allclose(maps[i], weighted, rtol=1e-6, atol=1e-9)
    assert not np.allclose(maps[2], expected_map[0])  # no anomaly box: the whole map is scaled


def test_filo_runs_with_a_tiny_grounding_dino_folder(clip):
    """The whole chain from a saved folder: the positions and boxes FiLo uses are those of the real detections."""
    rng = np.random.default_rng(4)
    train, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((2, 3, 32, 32)).astype(np.float32)
    detector = oodscope.create("filo", model=clip, descriptions=["crack"], layers=(1, 2), dpam_depth=1,
                               grounding=str(tiny_grounding_folder()), box_threshold=0.5).fit(train)
    scores, maps = detector.score_and_map(test)
    assert np.isfinite(scores).all() and np.isfinite(maps).all()
    loaded = load_grounding_dino(tiny_grounding_folder())
    caption, words = anomaly_caption(["crack"])
    for i, detection in enumerate(loaded.detect(test, caption)):
        boxes, box_scores = select_boxes(loaded, detection, words, box_threshold=0.5)
        alone = oodscope.create("filo", model=clip, descriptions=["crack"], layers=(1, 2), dpam_depth=1,
                                positions=[position_of(boxes, box_scores)]).fit(train)
        score, anomaly_map = alone.score_and_map(test[i:i + 1])
        np.testing.assert_allclose(scores[i], score[0], rtol=1e-6)
        np.testing.assert_allclose(maps[i], weight_outside(torch.from_numpy(anomaly_map[0]), boxes).numpy(),
                                   rtol=1e-6, atol=1e-9)


def test_bad_grounding_settings_and_folders_are_refused(clip, tmp_path):
    images = np.random.default_rng(0).random((2, 3, 32, 32)).astype(np.float32)
    base = dict(model=clip, descriptions=["crack"], layers=(1, 2))
    folder = str(tiny_grounding_folder())
    with pytest.raises(ValueError, match="leave positions=None"):
        oodscope.create("filo", grounding=folder, positions=["center"], **base).fit(images)
    for key, value in (("box_threshold", 1.5), ("outside_weight", -0.1), ("max_box_area", "big")):
        with pytest.raises(ValueError, match=f"{key} must be a number in"):
            oodscope.create("filo", grounding=folder, **{key: value}, **base).fit(images)
    with pytest.raises(ValueError, match="holds a 'clip' model, not a Grounding DINO"):
        load_grounding_dino(tiny_clip_folder())
    with pytest.raises(ValueError, match="is neither a local folder nor in the Hugging Face cache"):
        load_grounding_dino("nobody/no-such-grounding-dino")
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_grounding_folder().iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_grounding_dino(broken)
    with pytest.raises(ValueError, match="grounding must be a Grounding DINO folder"):
        oodscope.create("filo", grounding=3, **base).fit(images)


def test_a_caption_longer_than_the_model_reads_is_cut_with_a_warning(grounding):
    caption, _ = anomaly_caption(["crack", "hole", "scratch"] * 4)
    images = np.random.default_rng(1).random((1, 3, 32, 32)).astype(np.float32)
    with pytest.warns(UserWarning, match="Grounding DINO reads 32 tokens"):
        detection, = grounding.detect(images, caption)
    assert detection.token_probs.shape == (12, 32) and detection.input_ids[-1] == grounding.tokenizer.sep_token_id


def test_detections_do_not_depend_on_the_other_images_of_a_batch(grounding):
    images = np.random.default_rng(2).random((5, 3, 32, 32)).astype(np.float32)
    caption, _ = anomaly_caption(["crack"])
    together = grounding.detect(images, caption)
    alone = grounding.detect(images[3:4], caption)[0]
    np.testing.assert_array_equal(alone.token_probs, together[3].token_probs)
    np.testing.assert_array_equal(alone.boxes, together[3].boxes)


def test_grounding_set_after_the_fit_works_or_is_refused_clearly_and_is_saved(clip, tmp_path):
    rng = np.random.default_rng(6)
    train, test = rng.random((2, 3, 32, 32)).astype(np.float32), rng.random((3, 3, 32, 32)).astype(np.float32)
    base = dict(model=clip, descriptions=["crack"], layers=(1, 2), dpam_depth=1, box_threshold=0.5)
    folder = str(tiny_grounding_folder())
    late = oodscope.create("filo", **base).fit(train).set_params(grounding=folder)
    early = oodscope.create("filo", grounding=folder, **base).fit(train)
    for a, b in zip(late.score_and_map(test), early.score_and_map(test)):
        np.testing.assert_array_equal(a, b)
    restored = oodscope.load(early.save(tmp_path / "filo.oodscope"), model=clip)
    assert restored.get_params()["grounding"] == folder
    for a, b in zip(restored.score_and_map(test), early.score_and_map(test)):
        np.testing.assert_array_equal(a, b)
    fixed = oodscope.create("filo", positions=["top"], **base).fit(train)
    with pytest.raises(ValueError, match="leave positions=None"):
        fixed.set_params(grounding=folder).score(test)
    with pytest.raises(ValueError, match="refit it with positions=None"):
        fixed.set_params(positions=None).score(test)
    with pytest.raises(ValueError, match="outside_weight must be a number in"):
        early.set_params(outside_weight=5).score(test)
