"""The ``clinc150`` benchmark: out-of-scope intent detection (Larson et al., EMNLP 2019, CC BY 3.0).

``data_full.json`` holds ``[sentence, intent]`` pairs: in-scope ``train``/``val``/``test`` (15,000 / 3,000 / 4,500
over 150 intents) and out-of-scope ``oos_train``/``oos_val``/``oos_test`` (100 / 100 / 1,000).

* ID: the in-scope splits (class index = position of the intent in the sorted list of training intents);
* OOD validation (tuning only): ``oos_val``; OOD test group ``oos``: ``oos_test``. ``oos_train`` is not used (the
  classifier never sees out-of-scope data, the setting of the post-hoc detectors).

Every split is tokenized once for the all-MiniLM-L6-v2 classifier (:mod:`oodscope.text`) and stored **sorted by
token length** (stable), so batches carry little padding; the order of samples does not change any metric.
Intents of val/test that do not occur in train are refused with their names; empty texts, undecodable bytes and
over-long texts are handled by :func:`oodscope.text.tokens.tokenize` (errors, or truncation counted).

Where the data comes from: ``--data-root`` (a folder holding ``data_full.json``, or the file itself), else
``../shared/data/clinc150`` when it exists, else a download of the file published with the paper into the cache
directory, checked against :data:`SHA256` (tests never download).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .benchmark import Benchmark, Split

URL = "https://raw.githubusercontent.com/clinc/oos-eval/master/data/data_full.json"
SHA256 = "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0"  # of the copy in ../shared/data (not re-checked against the URL here: no internet)
LOCAL = Path("../shared/data/clinc150")
ID_SPLITS = ("train", "val", "test")
OOS_INTENT = "oos"


def resolve_path(data_root: str | Path | None, cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """``data_full.json`` from ``data_root``, the shared copy, or a checked download (see module docstring)."""
    if data_root is not None:
        root = Path(data_root)
        path = root if root.suffix == ".json" else root / "data_full.json"
        if not path.exists():
            raise FileNotFoundError(f"clinc150: {path} does not exist (--data-root must be a folder holding "
                                    "data_full.json, or the file itself)")
        return path
    if (LOCAL / "data_full.json").exists():
        return LOCAL / "data_full.json"
    from ..extraction.cache import default_cache_dir

    path = Path(cache_dir or default_cache_dir()) / "data" / "clinc150" / "data_full.json"
    if not path.exists():
        if not download:
            raise FileNotFoundError(f"clinc150: no data_full.json at {path}; pass --data-root")
        _download(URL, path)
    return path


def _download(url: str, path: Path) -> None:
    import os
    import tempfile
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {path}", file=sys.stderr)
    with urllib.request.urlopen(url, timeout=60) as response:
        payload = response.read()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != SHA256:
        raise ValueError(f"clinc150: downloaded file has sha256 {digest}, expected {SHA256}; not used "
                         "(download it yourself and pass --data-root)")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)
    os.replace(tmp, path)


def read_clinc150(path: str | Path) -> dict[str, list[tuple[Any, Any]]]:
    """The raw splits of ``data_full.json``, each a list of ``(text, intent)``, checked for shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"clinc150: {path} is not UTF-8 text ({error})") from error
    needed = set(ID_SPLITS) | {"oos_val", "oos_test"}
    missing = needed - set(data)
    if missing:
        raise ValueError(f"clinc150: {path} lacks splits {sorted(missing)} (has {sorted(data)})")
    for split in needed:
        bad = [i for i, item in enumerate(data[split]) if not (isinstance(item, list) and len(item) == 2)]
        if bad:
            raise ValueError(f"clinc150: split {split!r} items {bad[:5]} are not [sentence, intent] pairs")
    return {k: [tuple(item) for item in v] for k, v in data.items()}


def intent_index(data: dict[str, list[tuple[Any, Any]]]) -> list[str]:
    """Sorted training intents; raises when val/test use an intent the training split lacks."""
    names = sorted({intent for _, intent in data["train"]})
    if OOS_INTENT in names:
        raise ValueError("clinc150: the in-scope train split contains out-of-scope ('oos') items")
    known = set(names)
    for split in ("val", "test"):
        unknown = sorted({intent for _, intent in data[split]} - known)
        if unknown:
            count = sum(intent in unknown for _, intent in data[split])
            raise ValueError(f"clinc150: {count} {split} items have intents that are not in the train split: "
                             f"{unknown[:10]}; they cannot be scored as in-scope (fix the labels, or move them "
                             "to an out-of-scope split)")
    return names


def build_benchmark(data: dict[str, list[tuple[Any, Any]]], tokenizer: Any, max_length: int = 128,
                    name: str = "clinc150", sort_by_length: bool = True) -> tuple[Benchmark, dict[str, Any]]:
    """The :class:`Benchmark` of token arrays and, per split, its :class:`~oodscope.text.tokens.TokenReport`."""
    from ..text.tokens import tokenize

    classes = intent_index(data)
    lookup = {intent: i for i, intent in enumerate(classes)}
    splits, reports = {}, {}
    for split in ID_SPLITS + ("oos_val", "oos_test"):
        texts = [text for text, _ in data[split]]
        tokens, report = tokenize(texts, tokenizer, max_length=max_length, name=f"{name}/{split}")
        labels = (np.array([lookup[intent] for _, intent in data[split]], np.int64) if split in ID_SPLITS
                  else np.full(len(texts), -1, np.int64))
        if sort_by_length:
            order = np.argsort(tokens[:, 1].sum(axis=1), kind="stable")
            tokens, labels = tokens[order], labels[order]
        splits[split], reports[split] = Split(tokens, labels), report
    bench = Benchmark(name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                      ood={"oos": {"oos_test": splits["oos_test"]}}, ood_val={"oos_val": splits["oos_val"]},
                      class_names=classes)
    return bench, reports


def subsample(data: dict[str, list[tuple[Any, Any]]], per_class: int, n_oos: int, seed: int = 0,
              per_class_eval: int | None = None) -> dict[str, list[tuple[Any, Any]]]:
    """A small, class-balanced copy: ``per_class`` training items per intent, ``per_class_eval`` (default the
    same) per intent in val/test, and ``n_oos`` items of each out-of-scope split (seeded)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, items in data.items():
        if split.startswith("oos"):
            keep = rng.permutation(len(items))[:n_oos]
        else:
            count = per_class if split == "train" or per_class_eval is None else per_class_eval
            intents = np.array([intent for _, intent in items])
            keep = np.concatenate([rng.permutation(np.flatnonzero(intents == c))[:count]
                                   for c in np.unique(intents)])
        out[split] = [items[i] for i in np.sort(keep)]
    return out


def _model_cache(request: Any, tag: str, data_key: str) -> Path:
    from ..extraction.cache import default_cache_dir

    return Path(request.cache_dir or default_cache_dir()) / "models" / f"clinc150-minilm-{tag}-{data_key[:16]}.pt"


def _load(request: Any, who: str) -> tuple[Path, Benchmark, Any]:
    """``(data path, benchmark, encoder)`` of a request (subsampled with ``options["per_class"]``)."""
    from ..text.model import load_encoder

    if request.model is not None:
        raise ValueError(f"{who} builds its own all-MiniLM-L6-v2 classifier; --model does not apply")
    path = resolve_path(request.data_root, request.cache_dir)
    data = read_clinc150(path)
    per_class = int(request.options.get("per_class", 0))
    if per_class:
        data = subsample(data, per_class, int(request.options.get("n_oos", 10 * per_class)), request.seed,
                         request.options.get("per_class_eval"))
    tokenizer, encoder = load_encoder(request.options.get("encoder_path"))
    bench, reports = build_benchmark(data, tokenizer)
    for report in reports.values():
        if len(report.truncated) or len(report.empty) or len(report.replaced):
            print(report.summary(), file=sys.stderr)
    return path, bench, encoder


def _prepare(request: Any, finetune_layers: int):
    import torch

    from ..extraction.extract import extract
    from ..text.model import TextClassifier, finetune, fit_linear_head, set_head
    from .builtin import Prepared

    path, bench, encoder = _load(request, "clinc150")
    per_class = int(request.options.get("per_class", 0))
    model = TextClassifier(encoder, len(bench.class_names))
    subset = ((per_class, request.options.get("per_class_eval"), request.options.get("n_oos"), request.seed)
              if per_class else (per_class, request.seed))
    data_key = hashlib.sha256(path.read_bytes() + repr(subset).encode()).hexdigest()
    tag = "linear-v1" if not finetune_layers else f"ft{finetune_layers}-v1-seed{request.seed}"
    weights = _model_cache(request, tag, data_key)
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        if finetune_layers:
            finetune(model, bench.train.inputs, bench.train.labels, n_layers=finetune_layers, seed=request.seed,
                     log=lambda s: print(s, file=sys.stderr))
        else:  # frozen encoder: softmax regression on its (cached) sentence embeddings
            model.remember(True)  # the benchmark's own train extraction then reuses these encoder passes
            frozen = extract(model, (bench.train.inputs, bench.train.labels), name="clinc150-train-frozen",
                             cache_dir=request.cache_dir, device=request.device, progress=True)
            set_head(model, *fit_linear_head(frozen.features, bench.train.labels, len(bench.class_names)))
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
    name = "minilm-l6-linear" if not finetune_layers else f"minilm-l6-finetune{finetune_layers}"
    return Prepared(bench, model.eval(), None, name)


def prepare(request: Any):
    """``oodscope bench clinc150``: frozen all-MiniLM-L6-v2 + linear head trained on the in-scope train split."""
    return _prepare(request, 0)


def prepare_finetuned(request: Any):
    """``oodscope bench clinc150-ft``: the last transformer block and the head fine-tuned on in-scope train."""
    return _prepare(request, int(request.options.get("finetune_layers", 1)))


def oos_threshold_metrics(id_val: np.ndarray, oos_val: np.ndarray, val_correct: np.ndarray, id_test: np.ndarray,
                          oos_test: np.ndarray, test_correct: np.ndarray) -> dict[str, float]:
    """Larson et al.'s oos-threshold evaluation (Sec. 3.2-3.3) with an OOD score (higher = more out-of-scope).

    "The out-of-scope threshold was chosen to be the value which yielded the highest validation score across all
    intents, treating out-of-scope as its own intent": the threshold maximising 151-way accuracy on val + oos_val
    (an in-scope query is right when not flagged and its intent is right; an out-of-scope one when flagged).
    Test metrics: accuracy over the 4,500 in-scope queries (flagged = wrong) and recall on the 1,000 oos ones.
    """
    id_val, oos_val, id_test, oos_test = (np.asarray(a, np.float64) for a in (id_val, oos_val, id_test, oos_test))
    val_correct, test_correct = np.asarray(val_correct, bool), np.asarray(test_correct, bool)
    if len(val_correct) != len(id_val) or len(test_correct) != len(id_test):
        raise ValueError("oos_threshold_metrics: the correctness flags must match the in-scope scores one to one")
    if min(len(id_val), len(oos_val), len(id_test), len(oos_test)) == 0:
        raise ValueError("oos_threshold_metrics: needs in-scope and out-of-scope scores for both val and test")
    candidates = np.unique(np.r_[id_val, oos_val, np.inf])
    # flagged = score >= threshold; right in-scope = correctly classified and scored below the threshold
    right_in = np.searchsorted(np.sort(id_val[val_correct]), candidates, side="left")
    right_oos = len(oos_val) - np.searchsorted(np.sort(oos_val), candidates, side="left")
    best = candidates[int(np.argmax(right_in + right_oos))]
    return {"threshold": float(best),
            "val_accuracy_151": float(np.max(right_in + right_oos) / (len(id_val) + len(oos_val))),
            "in_scope_accuracy": float(np.mean((id_test < best) & test_correct)),
            "oos_recall": float(np.mean(oos_test >= best))}


# The BLOOD authors' recipe (fjelenic/between-layer-ood, ``TransformerClassifier.train_loop`` as called by their
# ``run.py``): Adam at 2e-5 for every parameter, head included, 10 epochs, batch 32, dropout on.
FULL_FINETUNE = {"epochs": 10, "lr": 2e-5, "head_lr": 2e-5, "batch_size": 32, "dropout": True}


def prepare_full_finetune(request: Any):
    """``oodscope bench clinc150-ftfull``: all of all-MiniLM-L6-v2 fine-tuned with a ``[CLS]`` head (BLOOD's setting).

    Every parameter is trained on the in-scope train split (:func:`oodscope.text.finetune.finetune_full`,
    settings :data:`FULL_FINETUNE`, overridable through ``request.options``; seed ``request.seed``). The trained
    weights are cached under ``<cache>/models`` keyed by the data and the settings; the run writes a resumable
    checkpoint next to them, so an interrupted fine-tuning continues where it stopped.
    """
    import torch

    from ..text.finetune import finetune_full
    from ..text.model import TextClassifier
    from .builtin import Prepared

    path, bench, encoder = _load(request, "clinc150-ftfull")
    per_class = int(request.options.get("per_class", 0))
    settings = {key: request.options.get(key, value) for key, value in FULL_FINETUNE.items()}
    model = TextClassifier(encoder, len(bench.class_names), pooling="cls")
    key = hashlib.sha256(path.read_bytes() + repr((per_class, request.options.get("per_class_eval"),
                                                   request.options.get("n_oos"), request.seed,
                                                   sorted(settings.items()))).encode()).hexdigest()
    weights = _model_cache(request, f"full-cls-v1-seed{request.seed}", key)
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        finetune_full(model, bench.train.inputs, bench.train.labels, seed=request.seed,
                      checkpoint=weights.with_suffix(".ckpt"), log=lambda s: print(s, file=sys.stderr, flush=True),
                      **settings)
        weights.parent.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(weights)
    return Prepared(bench, model.eval(), None, "minilm-l6-cls-finetuned")
