"""Meta-training of the learned methods (research code: nothing at runtime imports it).

* :mod:`.problems` — the training problem distribution and the held-out problems;
* :mod:`.meta` — ML2O's truncated-BPTT meta-trainer; :mod:`.gram_meta` — Gram-L2O's;
* ``python -m lab.meta_training recipes/ml2o_meta.yaml`` (or
  ``recipes/gram_l2o_meta.yaml``) retrains the shipped weights.
"""
