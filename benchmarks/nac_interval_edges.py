"""NAC on ResNet-20: the same neuron states binned with the authors' interval edges and with pytorch-ood's.

    PYTHONPATH=. python benchmarks/nac_interval_edges.py
"""
import sys; sys.path.insert(0, "benchmarks")
import numpy as np, oodscope
from suite2_data import model, sub_outputs
from oodscope.metrics import ood_metrics
net, pre = model(20)
tr = sub_outputs(20, net, pre, "train", 1000); te = sub_outputs(20, net, pre, "test", 500); oo = sub_outputs(20, net, pre, "near/cifar100", 500)
nac = oodscope.create("nac")
S = {k: nac.states(v)[0] for k, v in [("tr", tr), ("te", te), ("oo", oo)]}
def pt_edges(m, eps=1e-6):
    left = np.logspace(np.log10(eps), np.log10(0.5), m // 2 + 1); return np.r_[left, (1 - left[::-1])[1:]]
from oodscope.detectors.nac import interval_edges
for label, edges in [("authors", interval_edges(50)), ("pytorch-ood", pt_edges(50))]:
    nb = len(edges) - 1
    idx = {k: np.clip(np.searchsorted(edges, v, side="right") - 1, 0, nb - 1) for k, v in S.items()}
    flat = (idx["tr"] + np.arange(64) * nb).ravel()
    cov = np.minimum(np.bincount(flat, minlength=64 * nb).reshape(64, nb) / 50, 1)
    sc = {k: -cov[np.arange(64), i].mean(1) for k, i in idx.items()}
    print(label, 100 * ood_metrics(sc["te"], sc["oo"])["auroc"], "state quantiles", np.quantile(S["te"], [0.05, 0.5, 0.95]).round(4))
