"""The multi-gradient core: m per-objective losses in, one update out.

* loss-level methods (:mod:`align.mograd.scalarizations`): one backward of a scalar;
* gradient-level methods (:mod:`align.mograd.aggregators`): weights from the Gram matrix of the
  per-objective gradients;
* update-level methods (:mod:`align.mograd.learned`): the learned optimizer ML2O and its guarded
  version GML2O map the per-objective gradients, coordinate by coordinate, to the update
  (Gram-L2O, the learned method at LLM scale, is gradient-level);
* :mod:`align.mograd.engine`: runs any of the three kinds inside a training step, on one process or across
  processes.

``get_aggregator("mgda")`` returns any of them by name.
"""

from align.mograd.base import GradientAggregator, LossAggregator, UpdateAggregator
from align.mograd.registry import available_aggregators, get_aggregator, register_aggregator

__all__ = [
    "GradientAggregator",
    "LossAggregator",
    "UpdateAggregator",
    "available_aggregators",
    "get_aggregator",
    "register_aggregator",
]
