"""Pareto merging as a registered merge: ``merge_method: pareto``.

A config with ``models`` trains the artifact (options: the fields of
:class:`~align.merging.pareto.ParetoMergeOptions`) into OUT; a config with ``artifact: FOLDER``
and a preference or a sweep materialises checkpoints from a trained one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from align.merging.base import Merge
from align.merging.registry import register_merge_method


@register_merge_method("pareto")
class ParetoMerging(Merge):
    """Pareto merging (Chen & Kwok, ICML 2025): one compact artifact, any α materialised."""

    trains_artifact = True

    @property
    def options(self) -> dict[str, Any]:  # type: ignore[override]
        """The fields of :class:`~align.merging.pareto.ParetoMergeOptions` and their defaults."""
        from align.merging.pareto import ParetoMergeOptions

        return {
            f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(ParetoMergeOptions)
        }

    def check_options(self) -> None:
        from align.merging.pareto import ParetoMergeOptions

        ParetoMergeOptions(**self.params)  # every other check, before any work

    def run(self, config: Any, out: Path, *, overwrite: bool = False) -> list[Path]:
        from align.merging.pareto import ParetoArtifact, pareto_merge

        if config.artifact is None:
            options = dict(self.params)
            if options["dtype"] is None:
                options["dtype"] = config.dtype
            artifact = pareto_merge(
                config.models,
                out,
                base_model=config.base_model,
                options=options,
                max_shard_size=config.max_shard_size,
                overwrite=overwrite,
            )
            return [artifact.folder]
        artifact = ParetoArtifact(config.artifact)
        if config.preference is not None:
            return [
                artifact.materialize(
                    config.preference,
                    out,
                    overwrite=overwrite,
                    max_shard_size=config.max_shard_size,
                )
            ]
        from align.merging.io import folder_signature, sweep_grid, write_sweep

        def produce(alphas, folders):
            artifact.write_checkpoints(list(alphas), folders, max_shard_size=config.max_shard_size)

        return write_sweep(
            out,
            sweep_grid(config.sweep, artifact.objectives),
            produce,
            merge_method=self.name,
            job={
                "artifact": [str(artifact.folder), folder_signature(artifact.folder)],
                "max_shard_size": config.max_shard_size,
            },
            overwrite=overwrite,
            pass_size=config.pass_size,
        )
