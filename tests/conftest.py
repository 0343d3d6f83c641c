import numpy as np
import pytest

from oodscope import Head, Outputs


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def gaussian_outputs(rng, n=300, dim=16, n_classes=4, shift=0.0, name="data", labels=True):
    """Class-clustered features with a linear head; ``shift`` moves every sample away from the classes."""
    means = np.eye(n_classes, dim) * 4.0
    y = rng.integers(0, n_classes, n)
    features = means[y] + rng.normal(size=(n, dim)) + shift
    W = means / 4.0
    b = np.zeros(n_classes)
    logits = features @ W.T + b
    return Outputs(logits=logits, features=features, labels=y if labels else None, head=Head(W, b), name=name)


@pytest.fixture
def make_outputs(rng):
    return lambda **kw: gaussian_outputs(rng, **kw)


@pytest.fixture(scope="session")
def tiny_bert():
    """Factory of the tiny random BERT classifier below (a fresh model per call)."""
    return tiny_bert_classifier


def tiny_bert_classifier(pooling: str = "mean"):
    """A seeded random 3-block, 4-head BERT (hidden 16) wrapped in ``TextClassifier`` with 3 classes."""
    pytest.importorskip("transformers")
    import torch
    from transformers import BertConfig, BertModel

    from oodscope.text.model import TextClassifier

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=32, attn_implementation="eager")
    return TextClassifier(BertModel(config, add_pooling_layer=False), n_classes=3, pooling=pooling)
