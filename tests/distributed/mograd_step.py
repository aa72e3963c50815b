"""A few multi-objective training steps on several processes, for tests/test_mograd_engine.py.

Launched by the tests with ``accelerate launch`` (DDP over gloo, or DeepSpeed ZeRO on the CPU);
each process takes its rows of one global batch, and the adapter parameters after the steps are
saved by the main process. The same module computes the one-process reference on the whole
global batch (``run(None, ...)``), which the tests compare against.

    accelerate launch --config_file <config> tests/distributed/mograd_step.py OUT.pt \
        --methods linear,stch,mgda [--accumulation full] [--feature-level] [--micro-batches 2] \
        [--ranks 3,2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

import torch
import torch.nn.functional as F

OBJECTIVES = ("a", "b")
PREFERENCE = (0.4, 0.6)
ROWS_PER_PROCESS = 2  # per micro-batch: one row per objective
SEQ = 12
STEPS = 2
LR = 0.5
CLIP = 1.0  # the DeepSpeed configs of the tests clip at 1.0: every run clips alike
#: Names the tests may pass in --methods besides registered ones: (method, its options).
VARIANTS = {"mgda_loss": ("mgda", {"normalization": "loss"})}


def build_model(ranks: tuple[int, int] = (2, 2)):
    """The tiny PBLoRA model; ``ranks`` = (r1, r2). With (3, 2) some adapter tensors have an odd
    number of elements (9), so that two ZeRO-3 ranks hold padded partitions."""
    from peft import get_peft_model

    from align.adapters import PBLoraConfig, set_preference
    from align.testing import tiny_causal_lm

    model, _ = tiny_causal_lm(seed=0)
    r1, r2 = ranks
    config = PBLoraConfig(
        objectives=list(OBJECTIVES), init_weights=False, lora_dropout=0.0, r1=r1, r2=r2
    )
    torch.manual_seed(1)
    model = get_peft_model(model, config)
    set_preference(model, list(PREFERENCE))
    model.train()
    return model


def global_batch(world_size: int, micro_batches: int) -> torch.Tensor:
    """(micro_batches, world_size * ROWS_PER_PROCESS, SEQ) token ids."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(
        3, 500, (micro_batches, world_size * ROWS_PER_PROCESS, SEQ), generator=generator
    )


def objective_losses(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective a: next-token loss on the even rows; b: on the odd rows (different text, so
    different gradients). Means over rows, so the union's loss is the mean of the processes'."""
    logits = model(input_ids=ids).logits
    per_row = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none"
    ).mean(dim=1)
    return torch.stack([per_row[0::2].mean(), per_row[1::2].mean()]), logits


def run(
    accelerator,
    method: str,
    world_size: int,
    *,
    accumulation: str = "micro",
    feature_level: bool = False,
    micro_batches: int = 1,
    jacobian: str = "loop",
    weights: list | None = None,
    states: list | None = None,
    ranks: tuple[int, int] = (2, 2),
) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps; returns the trainable parameters (full, on every process).

    ``accelerator=None``: one plain process on the rows of all ``world_size`` processes (the
    reference the tests compare with). ``weights``: a list that gets the engine's weights of
    each step's last micro-batch; ``states``: a list that gets the engine's state (its
    ``state_dict``: the method's buffers, e.g. Gram-L2O's history) after each step.
    """
    from align.mograd.engine import MultiObjectiveEngine

    model = build_model(ranks)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    method, options = VARIANTS.get(method, (method, {}))
    engine = MultiObjectiveEngine(
        method,
        params,
        accelerator=accelerator,
        feature_level=feature_level,
        accumulation=accumulation,
        jacobian=jacobian,
        **options,
    )
    deepspeed = accelerator is not None and accelerator.state.deepspeed_plugin is not None
    for step in range(STEPS):
        batch = global_batch(world_size, micro_batches) + step  # a different batch each step
        if accelerator is not None:
            rank = torch.distributed.get_rank()
            batch = batch[:, rank * ROWS_PER_PROCESS : (rank + 1) * ROWS_PER_PROCESS]
        for micro in range(micro_batches):
            last = micro == micro_batches - 1
            if accelerator is not None:
                accelerator.gradient_state._set_sync_gradients(last)  # as transformers' Trainer
            losses, logits = objective_losses(model, batch[micro])
            loss = engine(
                losses,
                PREFERENCE,
                features=logits if feature_level else None,
                sync=last if accelerator is None else None,
            )
            loss = loss / micro_batches  # as transformers' Trainer (scale_wrt_gas=False)
            if accelerator is None:
                loss.backward()
            elif deepspeed:
                accelerator.backward(loss, scale_wrt_gas=False)
            else:
                context = contextlib.nullcontext() if last else accelerator.no_sync(model)
                with context:
                    accelerator.backward(loss)
        if accelerator is None:
            torch.nn.utils.clip_grad_norm_(params, CLIP)
        elif not deepspeed:
            accelerator.clip_grad_norm_(params, CLIP)
        optimizer.step()  # under DeepSpeed, accelerator.backward stepped (this is a no-op)
        optimizer.zero_grad()
        # Stateful loss-level methods: the engine observed the step's mean losses itself.
        if weights is not None and engine.last_weights is not None:
            weights.append(engine.last_weights.detach().clone().cpu())
        if states is not None:
            record = {
                k: v.detach().clone().cpu() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for k, v in engine.state_dict()["aggregator"].items()
            }  # (extra state, e.g. GradVac's, is not a tensor)
            if engine.state_is_sharded:  # this rank's coordinates: (parameter, start, count)
                record["layout"] = shard_layout(model, params)
            states.append(record)
    return {name: full_parameter(p).detach().clone().cpu() for name, p in zip(names, params)}


def shard_layout(engine, params) -> list[tuple[int, int, int]]:
    """ZeRO-1/2/3: the coordinates this rank holds, in the order of its gradient partition."""
    layout = []
    for index, param in enumerate(params):
        if hasattr(param, "ds_id"):  # ZeRO-3: rank r holds [r·n, r·n + n) of a padded split
            size = param.ds_tensor.numel()
            start = torch.distributed.get_rank(param.ds_process_group) * size
            count = max(0, min(size, param.ds_numel - start))
            if count:
                layout.append((index, start, count))
            continue
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:  # as ZeroShards reads it (the gradients are gone by now)
            address = mapping.lp_fragment_address
            layout.append((index, int(address.start), int(address.numel)))
    return layout


def full_parameter(param: torch.Tensor) -> torch.Tensor:
    if hasattr(param, "ds_id"):  # ZeRO-3: gather the partitioned fp32 master copy
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    if hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return param


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--methods", default="linear,stch,mgda")
    parser.add_argument("--accumulation", default="micro")
    parser.add_argument("--feature-level", action="store_true")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--jacobian", default="loop")
    parser.add_argument("--ranks", default="2,2", help="PBLoRA's r1,r2")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from accelerate import Accelerator

    accelerator = Accelerator()
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # DeepSpeed needs explicit batch sizes without a dataloader.
        world_size = torch.distributed.get_world_size()
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = ROWS_PER_PROCESS
        plugin.deepspeed_config["gradient_accumulation_steps"] = args.micro_batches
        plugin.deepspeed_config["train_batch_size"] = (
            ROWS_PER_PROCESS * world_size * args.micro_batches
        )
    results = {}
    for method in args.methods.split(","):
        weights, states = [], []
        results[method] = run(
            accelerator,
            method,
            torch.distributed.get_world_size(),
            accumulation=args.accumulation,
            feature_level=args.feature_level,
            micro_batches=args.micro_batches,
            jacobian=args.jacobian,
            weights=weights,
            states=states,
            ranks=tuple(int(r) for r in args.ranks.split(",")),
        )
        accelerator.free_memory()  # drop the prepared model (a new DeepSpeed engine each method)
        # Every rank's weights, step by step: the ranks must agree on them.
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, weights)
        results[f"weights/{method}"] = gathered
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, states)
        results[f"states/{method}"] = gathered
    results["world_size"] = torch.distributed.get_world_size()
    results["distributed_type"] = str(accelerator.distributed_type)
    if torch.distributed.get_rank() == 0:
        tmp = args.out + ".tmp"
        torch.save(results, tmp)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    from align.distributed import leave_process_group

    try:
        main()
    finally:
        leave_process_group()
    # The result is written and the group destroyed, yet the group's gloo threads (one
    # gloo_tcp_loop, two pt_gloo_runloop) are still alive under torch 2.13: something outside
    # Python still holds the group. Left to the interpreter's teardown they sometimes abort the
    # process (SIGABRT, "terminate called without an active exception": 3 of 12 launches of the
    # union-batch run here), which fails a run whose work is done. So the process ends now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
