"""Training-time OOD: fine-tune a classifier with a registered objective, then score it with any detector.

``model, history = finetune(model, (images, labels), "oe", outliers=aux_images, epochs=10)``; the objectives are
the ``training`` family of the one registry (``oodscope.available(family="training")``), one module each in
:mod:`oodscope.training.objectives`. The fine-tuned model goes back through ``oodscope.extract`` (its cache key is
its new weights), so every post-hoc detector scores it.
"""

from .engine import History, augment, finetune
from .objective import Objective

__all__ = ["History", "Objective", "augment", "finetune"]
