"""Side-by-side check of oodscope's EfficientAD against anomalib's ``EfficientAdModel`` with the same weights.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/efficientad_vs_anomalib.py [--size 256]   # with anomalib installed

anomalib (PyPI ``anomalib``, an independent implementation of Batzner et al., WACV 2024) is only a reference here.
The script fits our EfficientAD briefly on magnetic-tile images (a few steps: the point is equal computations, not
a good model), copies the teacher, student and autoencoder weights and the teacher's channel statistics into
anomalib's EfficientAD-S model, and compares on the same test images:

1. architecture: parameter counts of PDN-S (teacher 384, student 768 channels) and of the autoencoder;
2. the teacher-student distance ``(T - S)^2`` and the raw maps ``M_ST = mean_c (T - S)^2`` and
   ``M_AE = mean_c (A - S')^2`` on the PDN grid (anomalib's ``compute_student_teacher_distance`` and its
   autoencoder at the image size);
3. the hard-feature loss ``mean(D[D >= q_0.999(D)])`` (anomalib's ``compute_losses`` formula) on that distance;
4. the combined, quantile-normalised anomaly map and the image score. The conventions differ in one documented
   place: anomalib zero-pads the *raw* maps and upsamples before normalising, we normalise on the PDN grid, combine,
   zero-pad and upsample; both give the same values away from the 4-cell border, and anomalib's image score is the
   maximum of the upsampled map, ours the maximum on the grid. The script prints the largest differences and the
   rank correlation of the image scores.

anomalib's autoencoder uses a fixed 8 x 8 kernel at the bottleneck, so it needs 256 px inputs (the paper's size).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from benchmarks.common import magnetic_tile_dir
from oodscope.data.mvtec import load_mvtec
from oodscope.imagead import create
from oodscope.imagead.efficientad import MAP_PAD, hard_feature_loss


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy parameters in order (both modules list the same layers in the same order; shapes are checked)."""
    src, dst = list(source.state_dict().values()), target.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} vs {len(dst)} tensors")
    for (name, value), new in zip(dst.items(), src):
        if value.shape != new.shape:
            raise ValueError(f"{name}: {tuple(value.shape)} vs {tuple(new.shape)}")
        value.copy_(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="an MVTec-layout folder (default: the shared magnetic-tile)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--max-train", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=24)
    args = parser.parse_args()
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    start = time.perf_counter()
    data = load_mvtec(args.root or magnetic_tile_dir(), size=args.size, max_train=args.max_train)
    rng = np.random.default_rng(0)
    test = data.test.images[np.sort(rng.choice(len(data.test), args.n_test, replace=False))]
    ours = create("efficientad", distill_steps=3, distill_batch_size=4, distill_norm_batches=1, train_steps=8,
                  validation_fraction=0.2).fit(data.train.images)
    c = ours.out_channels
    theirs = EfficientAdModel(teacher_out_channels=c, model_size="small", padding=False, pad_maps=True)
    copy_weights(ours.teacher_, theirs.teacher)
    copy_weights(ours.student_, theirs.student)
    copy_weights(ours.autoencoder_, theirs.ae)
    with torch.no_grad():
        theirs.mean_std["mean"].copy_(ours.teacher_mean_)
        theirs.mean_std["std"].copy_(ours.teacher_std_)
        (qa_st, qb_st), (qa_ae, qb_ae) = ours.quantiles_st_, ours.quantiles_ae_
        for key, value in (("qa_st", qa_st), ("qb_st", qb_st), ("qa_ae", qa_ae), ("qb_ae", qb_ae)):
            theirs.quantiles[key].fill_(value)
    theirs.eval()
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"parameters  teacher {n_params(ours.teacher_)} / {n_params(theirs.teacher)}   student "
          f"{n_params(ours.student_)} / {n_params(theirs.student)}   autoencoder {n_params(ours.autoencoder_)} / "
          f"{n_params(theirs.ae)}  (ours / anomalib)")

    x = torch.from_numpy(test)
    normalised = ours.normalise_input(x)  # anomalib's networks normalise their [0, 1] input themselves
    with torch.no_grad():
        student_out, distance = theirs.compute_student_teacher_distance(x)
        their_st = distance.mean(1).double().numpy()
        ae_out = theirs.ae(x, x.shape[-2:])
        their_ae = ((ae_out - student_out[:, c:]) ** 2).mean(1).double().numpy()
        our_distance = (ours.teacher_features(x) - ours.student_(normalised)[:, :c]) ** 2
    our_st, our_ae = ours.raw_maps(test)
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())  # noqa: E731
    print(f"raw maps on the {our_st.shape[1]} x {our_st.shape[2]} PDN grid, max |ours - anomalib| / max: "
          f"M_ST {rel(our_st, their_st):.2e}, M_AE {rel(our_ae, their_ae):.2e}")
    d = distance.flatten()
    their_hard = d[d >= torch.quantile(d, 0.999)].mean().item()
    our_hard = hard_feature_loss(our_distance).item()
    print(f"hard-feature loss (q = 0.999): ours {our_hard:.6f}, anomalib's formula on its distance {their_hard:.6f}")

    with torch.no_grad():
        out = theirs(x)
    their_map = out.anomaly_map[:, 0].double().numpy()
    their_score = out.pred_score.double().numpy().ravel()
    our_score, our_map = ours.score_and_map(test)
    cell = args.size / our_st.shape[1]  # pixels per grid cell after padding and upsampling
    border = int(np.ceil((MAP_PAD + 1) * cell))
    inner = (slice(None), slice(border, -border), slice(border, -border))
    print(f"combined normalised map, away from the {border}-px border: max |ours - anomalib| = "
          f"{np.abs(our_map[inner] - their_map[inner]).max():.2e} (map range {np.ptp(their_map[inner]):.3f})")
    print(f"image scores: Spearman {spearmanr(our_score, their_score)[0]:.4f}; ours (grid max) - anomalib "
          f"(upsampled max): min {np.min(our_score - their_score):.4f}, max {np.max(our_score - their_score):.4f}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
