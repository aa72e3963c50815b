"""Learned multi-gradient methods: ML2O, its guarded version GML2O, and Gram-L2O.

Yang, Tang & Yang, "Learning to optimize by multi-gradient for multi-objective optimization"
(arXiv 2311.00559). A third kind of method (``kind = "update"``,
:class:`~align.mograd.base.UpdateAggregator`): the Jacobian ``J (m, P)`` in, the
update ``d (P,)`` out, coordinate by coordinate, with per-coordinate recurrent state.

* :mod:`~align.mograd.learned.network` — the coordinate-wise LSTM network and its scale-free
  gradient preprocessing;
* :mod:`~align.mograd.learned.ml2o` — ``get_aggregator("ml2o")``; default weights shipped in
  ``weights/`` (see ``weights/CARD.md``);
* :mod:`~align.mograd.learned.gml2o` — ``get_aggregator("gml2o")``: the learned step only when
  it passes a descent test against the MGDA step, else the MGDA step;
* :mod:`~align.mograd.learned.gram_l2o` — ``get_aggregator("gram_l2o")``: a *gradient-level*
  learned method (``kind = "gradient"``): a small network maps scale-free features of the m×m
  Gram matrix, the losses and a short history to simplex weights w, ``d = wᵀJ``, guarded by
  GML2O's test written on the Gram; it runs wherever MGDA runs (DDP, ZeRO-0/1/2/3,
  feature-level), with m × 19 numbers of state;
* ``lab/meta_training/`` (the repository's research code, not shipped) — meta-training (the
  problem distribution and the truncated-BPTT meta-trainers):
  ``python -m lab.meta_training recipes/ml2o_meta.yaml`` (or
  ``recipes/gram_l2o_meta.yaml``) retrains the weights.

The design choices the paper leaves open, and measured results, are in ``README.md`` here.
"""
