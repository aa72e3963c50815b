"""The demo: a dataset made here, PARM / GenARM / rewarded-soup routes, one α-sweep report."""

from align.demo.pipeline import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
