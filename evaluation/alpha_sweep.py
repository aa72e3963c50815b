"""α sweep and report for any routes: the script form of ``align evaluate``.

    python evaluation/alpha_sweep.py recipes/evaluate/positive_brief.yaml
    python evaluation/alpha_sweep.py recipes/evaluate/pku_saferlhf.yaml --set prompts.limit=100

Every route of the config (the base; a PARM, GenARM ARMs or MOD policies guiding it; a policy
with a preference adapter; merged checkpoints) answers the prompts at each α of the simplex
grid; every answer is scored by the configured scorers (offline ones or Hugging Face reward
models); the report folder gets front.png, report.json and summary.md (hypervolume, MIP,
Spearman ρ of each objective's score against its α). Generations are cached beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from align.sweep import load_sweep_config, run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    options = parser.parse_args()
    config = load_sweep_config(options.config, options.overrides)
    run_sweep(config)
    print((Path(config.output) / "summary.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
