"""α sweeps and their reports: every route answers at every α, scored on every objective.

``align evaluate CONFIG.yaml`` runs one from a config; :mod:`align.demo` builds its routes from
the models it trains.
"""

from align.sweep.report import route_metrics, spearman, summary_markdown, write_report
from align.sweep.routes import ROUTES, Route, build_route, register_route
from align.sweep.run import SweepConfig, load_sweep_config, load_sweep_prompts, run_sweep

__all__ = [
    "ROUTES",
    "Route",
    "SweepConfig",
    "build_route",
    "load_sweep_config",
    "load_sweep_prompts",
    "register_route",
    "route_metrics",
    "run_sweep",
    "spearman",
    "summary_markdown",
    "write_report",
]
