"""Fitting on a training set split over shards: merged sufficient statistics and sharded nearest neighbours.

* :func:`fit_from_shards` fits ``mahalanobis``, ``rmds``, ``vim``, ``residual`` and ``gmm`` from per-shard
  float64 statistics merged exactly (:mod:`oodscope.detectors._sufficient`), never holding more than one shard;
* the statistics themselves (:class:`ClassMoments`, :class:`ClassScatters`, :class:`CentredMoment`,
  :class:`WeightedMoments`, :func:`merge`) for reducing shards elsewhere (one Ray task per shard, say).

Example::

    from oodscope.detectors.sharded import fit_from_shards
    maha = fit_from_shards(oodscope.create("mahalanobis"), [train_part_0, train_part_1])
"""

from ._sufficient import (SHARDED, CentredMoment, ClassMoments, ClassScatters, WeightedMoments, fit_from_shards,
                          merge)

__all__ = ["SHARDED", "CentredMoment", "ClassMoments", "ClassScatters", "WeightedMoments", "fit_from_shards",
           "merge"]
