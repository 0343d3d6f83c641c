"""Fine-tuned [CLS] text classifier (pooling, resumable fine-tuning, the last-block shortcut), Larson et al.'s
oos-threshold metrics, and the bad-input cases of the CLINC150 loader not covered in test_text.py."""

import copy
import json

import numpy as np
import pytest

from oodscope.data.clinc150 import intent_index, oos_threshold_metrics, read_clinc150


@pytest.fixture(scope="module")
def cls_model(tiny_bert):
    return tiny_bert(pooling="cls")


def _tokens(seed=0, n=40, length=7):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, 2, length), np.int64)
    for i, k in enumerate(rng.integers(2, length + 1, n)):
        tokens[i, 0, :k] = np.r_[1, rng.integers(3, 50, k - 2), 2]
        tokens[i, 1, :k] = 1
    return tokens


class Stop(Exception):
    pass


def _stop_at(step):
    def log(message):
        if f"step {step}/" in message:
            raise Stop
    return log


def test_cls_pooling_lower_states_and_cls_top_match_the_full_forward(cls_model, tmp_path):
    import torch

    from oodscope.text.finetune import cls_top, lower_states
    from oodscope.text.model import TextClassifier

    tokens = _tokens()
    with torch.no_grad():
        states, _ = cls_model.hidden_states(torch.as_tensor(tokens))
        logits = cls_model(torch.as_tensor(tokens)).numpy()
        assert np.allclose(logits, cls_model.head(states[-1][:, 0]).numpy(), atol=1e-6)  # [CLS], no normalisation
        chunks = lower_states(cls_model, tokens, 2, chunk=16, store=tmp_path / "low")
        again = lower_states(cls_model, tokens, 2, chunk=16, store=tmp_path / "low")  # read back from the store
        rows = np.zeros_like(logits)
        for (index, s, m), (index2, s2, _) in zip(chunks, again):
            assert np.array_equal(index, index2) and torch.equal(s, s2)
            rows[index] = cls_model.head(cls_top(cls_model, s, m)).numpy()
            length = s.shape[1]
            assert torch.allclose(s, states[2][torch.as_tensor(index)][:, :length], atol=1e-5)
    assert np.allclose(rows, logits, atol=1e-5)
    assert sorted(np.concatenate([c[0] for c in chunks]).tolist()) == list(range(len(tokens)))
    with pytest.raises(ValueError, match="pooling must be 'mean'"):
        TextClassifier(cls_model.encoder, 3, pooling="max")


def test_finetune_last_cls_learns_and_resumes_to_the_same_weights(cls_model, tmp_path):
    import torch

    from oodscope.text.finetune import finetune_last_cls, lower_states

    tokens = _tokens(1)
    labels = tokens[:, 0, 1] % 3  # the first word piece decides the class: learnable through [CLS] attention
    chunks = lower_states(cls_model, tokens, 2, chunk=16)
    kwargs = dict(epochs=4, lr=1e-2, head_lr=3e-2, batch_size=8, seed=5, every=3)
    straight = finetune_last_cls(copy.deepcopy(cls_model), chunks, labels, **kwargs)
    model = copy.deepcopy(cls_model)
    with pytest.raises(Stop):  # killed right after the checkpoint of step 6
        finetune_last_cls(model, chunks, labels, checkpoint=tmp_path / "ck.pt", log=_stop_at(6), **kwargs)
    resumed = finetune_last_cls(copy.deepcopy(cls_model), chunks, labels, checkpoint=tmp_path / "ck.pt", **kwargs)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(straight.blocks[0].parameters(), cls_model.blocks[0].parameters()))
    losses = torch.load(tmp_path / "ck.pt", weights_only=False)["losses"]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # it learns
    with pytest.raises(ValueError, match="other settings"):
        finetune_last_cls(copy.deepcopy(cls_model), chunks, labels, checkpoint=tmp_path / "ck.pt",
                          **{**kwargs, "seed": 6})


def test_finetune_full_with_dropout_resumes_to_the_same_weights(cls_model, tmp_path):
    import torch

    from oodscope.text.finetune import batch_plan, finetune_full

    tokens, labels = _tokens(2, n=24), np.arange(24) % 3
    plan = batch_plan(tokens[:, 1].sum(axis=1), 8, 2, seed=0)
    assert len(plan) == 6 and sorted(np.concatenate(plan[:3]).tolist()) == list(range(24))
    kwargs = dict(epochs=2, lr=1e-3, batch_size=8, seed=1, every=2, dropout=True)
    assert cls_model.encoder.config.hidden_dropout_prob > 0  # dropout masks come from the checkpointed RNG
    straight = finetune_full(copy.deepcopy(cls_model), tokens, labels, **kwargs)
    with pytest.raises(Stop):
        finetune_full(copy.deepcopy(cls_model), tokens, labels, checkpoint=tmp_path / "f.pt", log=_stop_at(4),
                      **kwargs)
    resumed = finetune_full(copy.deepcopy(cls_model), tokens, labels, checkpoint=tmp_path / "f.pt", **kwargs)
    assert not resumed.training and not any(p.requires_grad for p in resumed.parameters())
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(straight.blocks[0].output.dense.weight, cls_model.blocks[0].output.dense.weight)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        finetune_full(copy.deepcopy(cls_model), tokens, np.full(24, 3))


def test_oos_threshold_metrics_hand_computed():
    # val: in-scope scores 0, 1, 2 (intent right, right, wrong), oos 3 and 1.5. Threshold 1.5 flags 2, 3, 1.5:
    # right = in-scope 0 and 1 + both oos = 4 of 5 (threshold 3 gives 2 + 1 = 3, inf gives 2 + 0).
    m = oos_threshold_metrics([0.0, 1.0, 2.0], [3.0, 1.5], [True, True, False], [0.0, 2.0, 1.0], [1.0, 5.0],
                              [True, True, False])
    assert m["threshold"] == 1.5 and m["val_accuracy_151"] == pytest.approx(0.8)
    assert m["in_scope_accuracy"] == pytest.approx(1 / 3) and m["oos_recall"] == 0.5
    with pytest.raises(ValueError, match="one to one"):
        oos_threshold_metrics([0.0], [1.0], [True, False], [0.0], [1.0], [True])


def test_clinc_loader_bad_files_and_oos_in_train(tmp_path):
    path = tmp_path / "data_full.json"
    path.write_bytes(b'{"train": [["caf\xe9", "a"]]}')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_clinc150(path)
    path.write_text(json.dumps({"train": [], "val": []}))
    with pytest.raises(ValueError, match=r"lacks splits \['oos_test', 'oos_val', 'test'\]"):
        read_clinc150(path)
    splits = {k: [["hi", "a"]] for k in ("train", "val", "test", "oos_val", "oos_test")}
    path.write_text(json.dumps({**splits, "test": [["hi", "a"], ["no intent"]]}))
    with pytest.raises(ValueError, match=r"split 'test' items \[1\] are not \[sentence, intent\] pairs"):
        read_clinc150(path)
    with pytest.raises(ValueError, match="train split contains out-of-scope"):
        intent_index({"train": [("x", "a"), ("y", "oos")], "val": [], "test": []})


def test_tokenize_refuses_a_max_length_without_room_for_special_tokens():
    from oodscope.text.tokens import tokenize

    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        tokenize(["a"], None, max_length=1)


def test_blood_warns_on_a_mean_pooled_classifier_only(cls_model):
    import warnings

    import oodscope
    from oodscope.text.model import TextClassifier

    tokens, labels = _tokens(3, n=6), np.arange(6) % 3
    out = oodscope.extract(cls_model, (tokens, labels), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = oodscope.create("blood", n_estimators=3).fit(out).score(out)
    assert scores.shape == (6,) and np.all(scores >= 0)
    mean_model = TextClassifier(cls_model.encoder, 3)  # pooling="mean"
    out = oodscope.extract(mean_model, (tokens, labels), progress=False)
    with pytest.warns(UserWarning, match=r"pooling='cls'"):
        oodscope.create("blood", n_estimators=3).fit(out).score(out)


def test_fine_tuning_leaves_the_callers_random_state_alone(tiny_bert):
    import numpy as np
    import torch

    from oodscope.text.finetune import finetune_full

    model = tiny_bert(pooling="cls")
    tokens = np.zeros((6, 2, 5), np.int64)
    tokens[:, 0, :3], tokens[:, 1, :3] = [1, 7, 2], 1
    state = torch.random.get_rng_state()
    finetune_full(model, tokens, np.array([0, 1, 2, 0, 1, 2]), epochs=1, batch_size=3)
    assert torch.equal(torch.random.get_rng_state(), state)
