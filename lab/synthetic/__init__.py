"""Synthetic multi-objective problems with known Pareto fronts, and solvers that run any
registered multi-gradient method on them — the test bench of :mod:`align.mograd`.

* :mod:`~lab.synthetic.problems`: ZDT1, ZDT2, VLMOP2, DTLZ2 as differentiable torch
  functions with bounds, dense true fronts and reference points;
* :mod:`~lab.synthetic.solvers`: a finite-set solver (one solution per α) and Pareto
  set learning (an α-conditioned network; by default the smooth Tchebycheff paper's protocol,
  ``PSL_PROTOCOL``), both scored by hypervolume gap.
"""

from lab.synthetic.problems import (
    DTLZ2,
    PROBLEMS,
    VLMOP2,
    ZDT1,
    ZDT2,
    SyntheticProblem,
    get_problem,
)
from lab.synthetic.solvers import (
    PSL_PROTOCOL,
    ParetoSetModel,
    SolveResult,
    evaluation_grid,
    hypervolume_gap,
    make_method,
    method_names,
    pareto_set_learning,
    solve_finite_set,
)

__all__ = [
    "DTLZ2",
    "PROBLEMS",
    "PSL_PROTOCOL",
    "ParetoSetModel",
    "VLMOP2",
    "ZDT1",
    "ZDT2",
    "SolveResult",
    "SyntheticProblem",
    "evaluation_grid",
    "get_problem",
    "hypervolume_gap",
    "make_method",
    "method_names",
    "pareto_set_learning",
    "solve_finite_set",
]
