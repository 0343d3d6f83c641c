"""CLIPN's open-world pre-training (image-caption pairs, the paper's CC3M mode) and its zero-shot use, on the tiny
random CLIP of ``vlm_models`` (no real CLIP weights here).

The loss of every batch is recomputed by hand from the tensors the training saw (image ``i`` with caption ``i``,
matched on the diagonal), the pre-training is seeded and resumes from its checkpoint, ``CLIPN(no_encoder=...)``
scores equal numpy from the loaded encoder, foreign files are refused, and the img2dataset folder reader is checked
on folders written here with PIL.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import oodscope  # noqa: E402
import oodscope.vlm.clipn as clipn_module  # noqa: E402
from oodscope.vlm.clipn import (NoTextEncoder, load_captioned_images, load_no_encoder,  # noqa: E402
                                pretrain_no_encoder)
from vlm_models import AlignedClip, tiny_clip  # noqa: E402

CLASSES = ["apple", "leaf", "sky"]
CAPTIONS = ["a red apple on a table", "green leaves in the rain", "blue sky over the sea", "a dog on the grass",
            "two cats asleep", "an old car in the street", "a tall tree", "waves on a beach", "a small bird"]
SETTINGS = dict(n_prompts=4, epochs=4, lr=3e-3, batch_size=4, seed=0)  # 9 pairs: batches of 4, 4 and 1


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
def pairs():
    images = np.random.default_rng(3).random((len(CAPTIONS), 3, 40, 36)).astype(np.float32)
    return images, list(CAPTIONS)


@pytest.fixture(scope="module")
def encoder_file(clip, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clipn") / "no_encoder.pt"
    history = pretrain_no_encoder(clip, *pairs, out, **SETTINGS)
    return out, history


def _params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["params"]


# -- (a) the loss of a batch by hand ---------------------------------------------------------------------------
def test_each_batch_pairs_image_i_with_caption_i_and_its_loss_is_the_hand_computed_itbo_plus_tso(
        clip, pairs, tmp_path, monkeypatch):
    images, captions = pairs
    real, seen = clipn_module.clipn_losses, []

    def spy(image, text_yes, text_no, match, scale):
        seen.append([t.detach().double().numpy().copy() for t in (image, text_yes, text_no, match.float())]
                    + [scale])
        return real(image, text_yes, text_no, match, scale)

    monkeypatch.setattr(clipn_module, "clipn_losses", spy)
    history = pretrain_no_encoder(clip, images, captions, tmp_path / "enc.pt", **SETTINGS)
    features = _unit(clip.encode_images(images, patches=False)[0])
    texts = _unit(clip.encode_texts(captions))
    assert len(seen) == SETTINGS["epochs"] * 3  # batches of 4, 4 and 1 per epoch
    hand = []
    for f, g, h, match, scale in seen:
        n = len(f)
        np.testing.assert_array_equal(match, np.eye(n))  # the authors' eyes: the diagonal is matched
        rows = [int(np.argmin(np.abs(features - row).max(axis=1))) for row in f]
        np.testing.assert_allclose(f, features[rows], atol=1e-6)
        np.testing.assert_allclose(g, texts[rows], atol=1e-6)  # image i goes with caption i
        assert scale == pytest.approx(clip.logit_scale)
        p_yes = 1.0 / (1.0 + np.exp(scale * (f @ h.T - f @ g.T)))
        loss_yes = -np.log(np.diag(p_yes)).mean()
        loss_tso = np.mean(2 - np.sqrt(2 - 2 * (g * h).sum(axis=1) + 1e-4))
        loss_no = -np.log(1 - p_yes)[~np.eye(n, dtype=bool)].mean() if n > 1 else 0.0  # one pair: no "no" pair
        hand.append((0.5 * (loss_yes + loss_no + loss_tso), n, rows))
    for epoch in range(SETTINGS["epochs"]):
        batches = hand[3 * epoch:3 * epoch + 3]
        assert sorted(r for _, _, rows in batches for r in rows) == list(range(len(captions)))  # every pair once
        expected = sum(loss * n for loss, n, _ in batches) / len(captions)
        assert history[epoch] == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(seen[0][2], seen[0][1], atol=1e-5)  # the first step: the "no" encoder is CLIP's copy


# -- (b) the loss goes down, the same seed gives the same encoder ----------------------------------------------
def test_pretraining_lowers_the_loss_trains_the_no_encoder_only_and_is_seeded(clip, pairs, encoder_file, tmp_path):
    path, history = encoder_file
    assert len(history) == SETTINGS["epochs"] and history[-1] < 0.9 * history[0]
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    again = pretrain_no_encoder(clip, *pairs, tmp_path / "again.pt", **SETTINGS)
    assert all(torch.equal(before[k], v) for k, v in clip.model.state_dict().items())  # CLIP stays frozen
    assert again == history
    first, second = _params(path), _params(tmp_path / "again.pt")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first["prompt_no"].shape == (4, 40, 32) and first["prompt_no"].abs().max() > 0  # the prompts moved
    pretrain_no_encoder(clip, *pairs, tmp_path / "seed1.pt", **{**SETTINGS, "seed": 1})
    assert not torch.equal(_params(tmp_path / "seed1.pt")["prompt_no"], first["prompt_no"])  # other draws
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temporary file


# -- (c) resume from the checkpoint ----------------------------------------------------------------------------
def test_a_pretraining_killed_in_its_second_epoch_resumes_from_the_checkpoint_to_the_same_encoder(
        clip, pairs, encoder_file, tmp_path, monkeypatch):
    path, history = encoder_file
    real, calls = clipn_module.clipn_losses, []

    def dies_in_epoch_2(*args):
        calls.append(1)
        if len(calls) > 3 + 1:  # 3 batches per epoch: killed at the second batch of the second epoch
            raise KeyboardInterrupt
        return real(*args)

    out, checkpoint = tmp_path / "enc.pt", tmp_path / "ckpt.pt"
    monkeypatch.setattr(clipn_module, "clipn_losses", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain_no_encoder(clip, *pairs, out, checkpoint=checkpoint, **SETTINGS)
    assert checkpoint.exists() and not out.exists()
    monkeypatch.setattr(clipn_module, "clipn_losses", real)
    resumed = pretrain_no_encoder(clip, *pairs, out, checkpoint=checkpoint, **SETTINGS)
    assert resumed == history
    whole, again = _params(path), _params(out)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    with pytest.raises(ValueError, match="belongs to another fit"):
        pretrain_no_encoder(clip, *pairs, out, checkpoint=checkpoint, **{**SETTINGS, "seed": 5})


# -- (d) zero-shot CLIPN with the pre-trained encoder ----------------------------------------------------------
@pytest.mark.parametrize("scoring", ["atd", "ctw"])
def test_zero_shot_clipn_scores_equal_numpy_from_the_loaded_encoder(clip, encoder_file, pairs, scoring, tmp_path):
    path, _ = encoder_file
    detector = oodscope.create("clipn", model=clip, no_encoder=str(path), scoring=scoring).fit(CLASSES)
    assert detector.get_params()["no_encoder"] == str(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder = NoTextEncoder(clip.model, state["n_prompts"])
    encoder.load_state_dict(state["params"], strict=False)
    prompts = [f"a photo of a {c}." for c in CLASSES]
    with torch.no_grad():
        h = _unit(encoder.eval()(torch.as_tensor(clip.tokenize(prompts)["input_ids"])).numpy())
    g = _unit(clip.encode_texts(prompts))
    np.testing.assert_allclose(detector.no_text_embeddings_, h, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(detector.text_embeddings_, g, rtol=1e-6, atol=1e-7)
    assert np.abs(h - g).max() > 1e-3  # the pre-trained "no" texts differ from the standard ones
    images = pairs[0]
    f = _unit(clip.encode_images(images)[0])
    s = clip.logit_scale
    yes, no = s * f @ g.T, s * f @ h.T
    p_yes = np.exp(yes) / (np.exp(yes) + np.exp(no))
    p = _softmax(yes)
    expected = -(p_yes * p).sum(axis=1) if scoring == "atd" else -p_yes[np.arange(len(p)), p.argmax(axis=1)]
    np.testing.assert_allclose(detector.score(images), expected, rtol=1e-6)
    saved = detector.save(tmp_path / "clipn.oodscope")
    np.testing.assert_array_equal(oodscope.load(saved, model=clip).score(images), detector.score(images))


def test_zero_shot_clipn_refuses_training_images_and_a_bad_no_encoder_parameter(clip, encoder_file, pairs):
    path, _ = encoder_file
    labels = np.array([0, 1, 2] * 3)
    with pytest.raises(ValueError, match="makes the fit zero-shot"):
        oodscope.create("clipn", model=clip, no_encoder=str(path)).fit(CLASSES, pairs[0], labels)
    with pytest.raises(ValueError, match="makes the fit zero-shot"):
        oodscope.create("clipn", model=clip, no_encoder=str(path)).fit((CLASSES, pairs[0], labels))
    with pytest.raises(ValueError, match="no_encoder must be None or the path"):
        oodscope.create("clipn", model=clip, no_encoder=3).fit(CLASSES)
    with pytest.raises(ValueError, match="or a pre-trained no_encoder"):
        oodscope.create("clipn", model=clip).fit(CLASSES)


# -- (e) foreign, damaged and other-CLIP files -----------------------------------------------------------------
def test_foreign_damaged_and_other_clip_files_are_refused_with_a_clear_message(clip, pairs, encoder_file, tmp_path):
    path, _ = encoder_file
    detector = oodscope.create("clipn", model=clip)
    corrupt, raw, cases = "truncated or corrupt, or not a PyTorch file", path.read_bytes(), {}
    cases["random bytes"] = np.random.default_rng(0).bytes(4096), corrupt
    cases["plain pickle"] = pickle.dumps({"params": [1, 2, 3]}, protocol=2), corrupt
    cases["truncated"] = raw[: len(raw) // 2], corrupt
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
    for name, payload, message in [
            ("other torch file", {"weights": torch.zeros(3)}, 'not a "no" encoder written by'),
            ("pickled object", {"format": "oodscope.clipn.no_encoder", "x": AlignedClip}, "holds a pickled"),
            ("damaged", {**torch.load(path, weights_only=True), "params": {"prompt_no": torch.zeros(2)}}, "damaged"),
            ("newer", {**torch.load(path, weights_only=True), "version": 99}, "format version 99")]:
        torch.save(payload, tmp_path / name)
        cases[name] = None, message
    other = tmp_path / "other clip"
    pretrain_no_encoder(tiny_clip(seed=1), *pairs, other, n_prompts=2, epochs=1, batch_size=9)
    cases["other clip"] = None, "was pre-trained from another CLIP model"
    for name, (_, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            detector.set_params(no_encoder=str(tmp_path / name)).fit(CLASSES)
    with pytest.raises(FileNotFoundError, match="does not exist; write one with"):
        load_no_encoder(tmp_path / "missing.pt", clip)
    with pytest.raises(ValueError, match="not a Hugging Face CLIP"):
        load_no_encoder(path, AlignedClip())
    assert load_no_encoder(path, clip).prompt_no.shape == (4, 40, 32)


def test_pretraining_refuses_bad_pairs_and_parameters(clip, pairs, tmp_path):
    images, captions = pairs
    out = tmp_path / "enc.pt"
    bad = images.copy()
    bad[5, 0, 0, 0] = np.nan
    for args, kwargs, message in [
            ((images, captions[:-1]), {}, "9 images but 8 captions"),
            ((images, captions[:-1] + ["  "]), {}, r"captions at positions \[8\] are empty"),
            ((images, captions[:-1] + [3]), {}, r"captions at positions \[8\] are not strings"),
            ((images, "one caption"), {}, "not a single string"),
            ((images[:1], captions[:1]), {}, "at least 2"),
            ((bad, captions), {}, "NaN or inf"),
            ((images, captions), {"epochs": 0}, "epochs must be a positive integer"),
            ((images, captions), {"lr": -1.0}, "lr must be > 0"),
            ((images, captions), {"weight_decay": float("nan")}, "weight_decay must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            pretrain_no_encoder(clip, *args, out, **kwargs)
    with pytest.raises(ValueError, match="not a Hugging Face CLIP"):
        pretrain_no_encoder(AlignedClip(), images[:, :, :32, :32], captions, out)
    with pytest.raises(ValueError, match="out must be the path"):
        pretrain_no_encoder(clip, images, captions, tmp_path)
    assert not out.exists()


# -- (f) the img2dataset folder reader -------------------------------------------------------------------------
def _write_shards(root, sizes=((40, 30), (24, 32), (33, 33)), captions=("a red apple", "a leaf", "the sky")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, ((w, h), caption) in enumerate(zip(sizes, captions)):
        shard = root / f"{i // 2:05d}"
        shard.mkdir(parents=True, exist_ok=True)
        key = f"{i // 2:05d}{i % 2:04d}"
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        (image.convert("L") if i == 1 else image).save(shard / f"{key}.jpg")
        (shard / f"{key}.txt").write_text(caption + "\n")
        (shard / f"{key}.json").write_text("{}")
        (root / f"{i // 2:05d}.parquet").write_bytes(b"PAR1")
        (root / f"{i // 2:05d}_stats.json").write_text("{}")
    return root


def test_the_img2dataset_files_layout_is_read_in_order_at_the_given_size(clip, tmp_path):
    from oodscope.data.spec import read_image

    root = _write_shards(tmp_path / "cc3m")
    images, captions = load_captioned_images(root, 32)
    assert images.dtype == np.uint8 and images.shape == (3, 3, 32, 32)
    assert captions == ["a red apple", "a leaf", "the sky"]
    files = sorted(root.glob("*/*.jpg"))
    assert [f.name for f in files] == ["000000000.jpg", "000000001.jpg", "000010000.jpg"]
    for image, file in zip(images, files):
        np.testing.assert_array_equal(image, read_image(file, 32).transpose(2, 0, 1))
    first, two = load_captioned_images(root, 16, limit=2)
    assert first.shape == (2, 3, 16, 16) and two == ["a red apple", "a leaf"]
    history = pretrain_no_encoder(clip, images, captions, tmp_path / "enc.pt", n_prompts=2, epochs=1)
    assert len(history) == 1 and np.isfinite(history[0])  # the reader's output is what pre-training takes


def test_the_folder_reader_refuses_missing_folders_and_bad_pairs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_captioned_images(tmp_path / "nowhere", 32)
    (tmp_path / "empty" / "00000").mkdir(parents=True)
    (tmp_path / "empty" / "00000" / "000000000.txt").write_text("a caption without image")
    with pytest.raises(ValueError, match="holds no images"):
        load_captioned_images(tmp_path / "empty", 32)
    root = _write_shards(tmp_path / "no caption")
    (root / "00000" / "000000001.txt").unlink()
    with pytest.raises(ValueError, match=r"000000001.jpg has no caption file 000000001.txt"):
        load_captioned_images(root, 32)
    assert load_captioned_images(root, 32, limit=1)[1] == ["a red apple"]  # only the pairs read are checked
    root = _write_shards(tmp_path / "empty caption")
    (root / "00001" / "000010000.txt").write_text("  \n")
    with pytest.raises(ValueError, match="000010000.txt is empty"):
        load_captioned_images(root, 32)
    (root / "00001" / "000010000.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_captioned_images(root, 32)
    root = _write_shards(tmp_path / "corrupt")
    (root / "00000" / "000000001.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"cannot read image .*000000001.jpg"):
        load_captioned_images(root, 32)
    for size, limit, message in [(0, None, "size must be a positive integer"),
                                 (32, 0, "limit must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            load_captioned_images(root, size, limit=limit)


def test_zero_shot_templates_average_both_embeddings_per_class_as_the_authors(clip, encoder_file):
    path, _ = encoder_file
    templates = ["a photo of a {}.", "a sketch of the {}.", "itap of a {}."]
    detector = oodscope.create("clipn", model=clip, no_encoder=str(path), templates=templates).fit(CLASSES)
    encoder = load_no_encoder(path, clip)
    for fitted, tower in ((detector.text_embeddings_, None), (detector.no_text_embeddings_, encoder)):
        for c, name in enumerate(CLASSES):
            prompts = [t.format(name) for t in templates]
            if tower is None:
                unit = _unit(clip.encode_texts(prompts))
            else:
                with torch.no_grad():
                    unit = _unit(tower(torch.as_tensor(clip.tokenize(prompts)["input_ids"])).numpy())
            np.testing.assert_allclose(fitted[c], _unit(unit.mean(axis=0)), rtol=1e-6, atol=1e-7)
    single = oodscope.create("clipn", model=clip, no_encoder=str(path)).fit(CLASSES)
    assert np.abs(single.text_embeddings_ - detector.text_embeddings_).max() > 1e-4
    with pytest.raises(ValueError, match="templates= applies to the zero-shot fit"):
        oodscope.create("clipn", model=clip, templates=templates).fit(CLASSES, np.zeros((3, 3, 32, 32)), [0, 1, 2])
    for bad in (["no placeholder"], [], "a photo of a {}."):
        with pytest.raises(ValueError, match="templates must be a non-empty list"):
            oodscope.create("clipn", model=clip, no_encoder=str(path), templates=bad).fit(CLASSES)
