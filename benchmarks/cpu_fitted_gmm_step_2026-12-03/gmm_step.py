"""Time the FittedGMM trainer's per-network extra work (fit_step + rectified pseudo-labels) on random features.

Usage: python gmm_step.py C K  (C feature channels, K classes; batch 2 labeled + 2 unlabeled 64 x 64, one thread).
Run it with PYTHONPATH pointing at the tree to measure (e.g. a worktree of an older commit) to compare versions.
"""
import sys
import time

import torch

from nnssl.gmm import DiagonalGaussianMixture
from nnssl.losses.guidednet import gmm_rectified_pseudo_labels

torch.set_num_threads(1)
C, K = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
features = torch.randn(4, C, 64, 64)
labels = torch.randint(0, K, (2, 1, 64, 64))
logits = torch.randn(4, K, 64, 64)
gmm = DiagonalGaussianMixture(K, C, 3)


def timed(fn, repeats=30):
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2] * 1e3


fit = timed(lambda: gmm.fit_step(features[:2], labels, 3, 0.9, 4096))
post = timed(lambda: gmm.class_posterior(features[2:]))
both = timed(lambda: (gmm.fit_step(features[:2], labels, 3, 0.9, 4096),
                      gmm_rectified_pseudo_labels(logits[2:], features[2:], gmm, 1.0)))
print(f"C={C} K={K}: fit_step {fit:.2f} ms, class_posterior {post:.2f} ms, fit + rectified pseudo-labels {both:.2f} ms"
      " (medians of 30)")
