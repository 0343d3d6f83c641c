"""Plain cross-entropy: the control every training-time method is compared with.

``L = -1/B sum_i log softmax(f(x_i))_{y_i}``, the standard classification loss. Fine-tuning with it on the same
schedule, data order and seeds as a method separates the method's effect from that of the extra fine-tuning.
"""

from __future__ import annotations

from ..objective import Objective


class CrossEntropy(Objective):
    """``L = CE(f(x), y)`` (the control)."""

    name = "cross_entropy"

    def loss(self, logits, labels, outlier_logits=None, **context):
        from torch.nn import functional as F

        ce = F.cross_entropy(logits, labels)
        return ce, {"ce": float(ce.detach())}
