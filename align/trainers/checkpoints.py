"""What every align trainer adds to transformers' checkpoints: they appear whole or not at all,
carry the multi-objective method's state, and the adapter travels with its training record.

:class:`AtomicCheckpoints` is a mixin placed before the TRL trainer in the bases; it needs
``self.engine`` (a :class:`~align.mograd.engine.MultiObjectiveEngine`, or None when the trainer
has no stateful method) and ``self.training_info()`` (the record written beside the adapter).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import rotate_checkpoints

from align.io import atomic_file
from align.rewards.arm import TRAINING_INFO

MOGRAD_STATE = "mograd_state.pt"
#: A sharded method state (ML2O / GML2O under ZeRO-1/2): one file per rank.
MOGRAD_SHARD_STATE = "mograd_state_rank{rank}.pt"


class AtomicCheckpoints:
    """Atomic checkpoints and final adapters, with the multi-gradient method's state."""

    engine: Any = None

    def training_info(self) -> dict[str, Any]:  # pragma: no cover - every trainer overrides
        raise NotImplementedError

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            # The objective names travel with the adapter, whatever its type (LoRA has no field).
            with atomic_file(os.path.join(output_dir, TRAINING_INFO)) as path:
                path.write_text(json.dumps(self.training_info(), indent=2))

    def save_final(self, target: str | os.PathLike) -> Path:
        """Save the trained adapter (and tokenizer) to ``target`` atomically: every process
        writes into a staging folder, then the main process renames it into place."""
        target = Path(target)
        staging = target.parent / f".{target.name}.partial"
        self.save_model(str(staging))
        self._publish(staging, target)
        return target

    def _publish(self, staging: Path, target: Path) -> None:
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Checkpoints appear whole or not at all: TRL / transformers write ``checkpoint-N`` in
        a staging folder (all processes, as DeepSpeed writes one shard per rank), which is then
        renamed into place, so a run killed mid-save resumes from the previous checkpoint."""
        if trial is not None:  # hyperparameter search: leave transformers' layout alone
            return super()._save_checkpoint(model, trial)
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = run_dir / f".{name}.partial"
        # A staging folder left by a run killed while it wrote this checkpoint: none of its
        # files may end up in the new one. The barriers are unconditional: whether the folder
        # exists depends on when each process looks (the main one may have started writing).
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
            state = self.engine.state_dict() if self.engine is not None else {"aggregator": {}}
            if getattr(self.engine, "state_is_sharded", False):
                # ML2O / GML2O under ZeRO-1/2/3: every rank saves its own partition of the state
                # (resumed with the same world size).
                shard = state["shard"]["rank"]
                torch.save(state, staging_root / name / MOGRAD_SHARD_STATE.format(rank=shard))
            elif self.args.should_save and any(state["aggregator"]):
                torch.save(state, staging_root / name / MOGRAD_STATE)
        finally:
            self.args.output_dir = str(run_dir)
        best = self.state.best_model_checkpoint
        if best and best.startswith(str(staging_root)):
            self.state.best_model_checkpoint = str(run_dir / name)
        self._publish(staging_root / name, run_dir / name)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The optimizer's and scheduler's state, and the multi-objective method's. Here rather
        than in ``_load_from_checkpoint``, which transformers does not call under DeepSpeed (it
        loads the model with ``deepspeed_load_checkpoint`` instead): this one runs on every
        resume, whatever the backend, once the model is prepared."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.engine is None:
            return
        path = os.path.join(checkpoint, MOGRAD_STATE)
        sharded = os.path.join(
            checkpoint, MOGRAD_SHARD_STATE.format(rank=self.accelerator.process_index)
        )
        if os.path.exists(sharded):
            self.engine.load_state_dict(torch.load(sharded, weights_only=True))
        elif os.path.exists(os.path.join(checkpoint, MOGRAD_SHARD_STATE.format(rank=0))):
            raise ValueError(
                f"{checkpoint} holds the {self.engine.name} state per rank of a ZeRO run with "
                f"fewer processes than this one ({self.accelerator.num_processes}, no "
                f"{os.path.basename(sharded)}): resume with the same world size"
            )
        elif os.path.exists(path):
            self.engine.load_state_dict(torch.load(path, weights_only=True))
