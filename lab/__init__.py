"""Research code of align, apart from the library: the wheel neither ships nor imports it.

* :mod:`lab.synthetic` — synthetic multi-objective problems with known Pareto fronts and the
  solvers that run any registered multi-gradient method on them (the test bench of
  :mod:`align.mograd`; ``evaluation/mograd_synthetic.py``);
* :mod:`lab.meta_training` — meta-training of the learned aggregators (ML2O, GML2O, Gram-L2O)
  whose weights ship in ``align/mograd/learned/weights/``:
  ``python -m lab.meta_training recipes/ml2o_meta.yaml`` from the repository root.
"""
