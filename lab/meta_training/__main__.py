"""Meta-train ML2O (or Gram-L2O) from a recipe and write the weights.

    python -m lab.meta_training recipes/ml2o_meta.yaml
    python -m lab.meta_training recipes/gram_l2o_meta.yaml   # method: gram_l2o
    python -m lab.meta_training recipes/ml2o_meta.yaml --output /tmp/ml2o.safetensors \\
        --set max_minutes=1 --set iterations=50

The recipe's ``meta:`` block holds the fields of :class:`~lab.meta_training.meta.MetaConfig`;
``method:`` is ``ml2o`` (default) or ``gram_l2o`` (:mod:`~lab.meta_training.gram_meta`);
``output:`` is where the weights go (relative paths from the current directory). The weights
file carries the network config and a summary of the run (settings, wall time, validation of
the untrained = MGDA network and of the trained one) in its metadata
(:func:`~align.mograd.learned.ml2o.network_info`).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.meta_training")
    parser.add_argument("recipe", help="a YAML recipe (recipes/ml2o_meta.yaml)")
    parser.add_argument("--output", help="where to write the weights (default: the recipe's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a meta field"
    )
    args = parser.parse_args(argv)

    import torch

    from align.config import build_dataclass, check_fields, read_config

    for item in args.set:
        if "=" not in item:
            parser.error(f"--set needs FIELD=VALUE, got {item!r}")
    recipe = read_config(args.recipe, "meta-training recipe", [f"meta.{i}" for i in args.set])
    check_fields(recipe, {"method", "meta", "output"}, "meta-training recipe")
    method = str(recipe.get("method", "ml2o")).lower()
    if method == "gram_l2o":
        from align.mograd.learned.gram_l2o import save_gram_network as save_network
        from lab.meta_training.gram_meta import GramMetaConfig as MetaConfig
        from lab.meta_training.gram_meta import meta_train_gram as meta_train
    elif method == "ml2o":
        from align.mograd.learned.ml2o import save_network
        from lab.meta_training.meta import MetaConfig, meta_train
    else:
        parser.error(f"method must be ml2o or gram_l2o, got {method!r}")
    config = build_dataclass(MetaConfig, recipe.get("meta") or {}, "meta-training recipe 'meta'")
    output = Path(args.output or recipe.get("output") or f"{method}.safetensors")
    net, summary = meta_train(config, log=lambda line: print(line, flush=True))
    summary.update(
        recipe=str(args.recipe),
        torch=torch.__version__,
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
    )
    path = save_network(net, output, **summary)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    from align.errors import describe, user_error_types

    try:
        sys.exit(main())
    except user_error_types() as error:
        sys.exit(f"error: {describe(error)}")
