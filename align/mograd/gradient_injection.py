"""How :mod:`align.mograd.engine` injects its direction into the gradients: process groups, the
surrogate whose backward delivers it, Accelerate / DDP checks, DeepSpeed ZeRO partitions.

Nothing here is public API. The DeepSpeed part reads and writes ZeRO's gradient partitions
through the attributes DeepSpeed itself uses in ``deepspeed.utils.tensor_fragment``
(``param._hp_mapping`` for ZeRO-1/2, ``safe_get_local_grad`` for ZeRO-3); it was written and
tested against DeepSpeed 0.19.8 and fails with a clear error where those attributes are missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# ----------------------------------------------------------------------------- processes


def world(group: Any = None) -> tuple[Any, int]:
    """``(group, size)`` of the data-parallel group; size 1 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    return group, dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """This process's rank in the group; 0 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def all_reduce_sum(tensor: Tensor, group: Any) -> Tensor:
    """In-place SUM all-reduce (gloo and NCCL alike), returning the tensor."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ------------------------------------------------------------------------ the surrogate


class InjectGradient(torch.autograd.Function):
    """``value`` in the forward; in the backward, ``grad_output · directions[k]`` for
    ``params[k]`` — whatever graph produced the per-objective gradients is not touched again.

    Backpropagating the result is exactly like backpropagating a loss whose gradient is the
    given directions: it lands in ``.grad`` through the parameters' ``AccumulateGrad`` nodes, so
    it adds to accumulated gradients, fires DDP's and DeepSpeed's reduction hooks, and is
    multiplied by whatever scaled the scalar (an AMP loss scale, ``1 / accumulation_steps``).
    """

    @staticmethod
    def forward(ctx, value: Tensor, directions: Sequence[Tensor | None], *params: Tensor):
        ctx.directions = directions
        ctx.dtypes = [p.dtype for p in params]
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grads = []
        for direction, dtype in zip(ctx.directions, ctx.dtypes):
            grads.append(None if direction is None else (grad_output * direction).to(dtype))
        ctx.directions = None
        return (None, None, *grads)


def inject(value: Tensor, params: Sequence[nn.Parameter], directions: Sequence[Tensor | None]):
    """A scalar with ``value``'s value whose gradient w.r.t. ``params[k]`` is ``directions[k]``."""
    return InjectGradient.apply(value, list(directions), *params)


def split_like(flat: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """Views of a flat (P,) vector shaped like each parameter (no copy)."""
    sizes = [p.numel() for p in params]
    return [piece.view(p.shape) for piece, p in zip(flat.split(sizes), params)]


# ----------------------------------------------------------------------------- Accelerate


def grad_scale(accelerator: Any) -> float | None:
    """The current AMP loss scale (fp16 ``GradScaler``), or None without loss scaling."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return float(scaler.get_scale())


def sync_gradients(accelerator: Any) -> bool:
    """Whether this micro-batch ends an optimizer step: Accelerate's ``sync_gradients`` (which
    transformers' Trainer sets before every micro-batch), from ``accelerator`` or else from
    Accelerate's process-wide ``GradientState`` once an Accelerator exists; True when unknown."""
    if accelerator is not None and hasattr(accelerator, "sync_gradients"):
        return bool(accelerator.sync_gradients)
    try:
        from accelerate.state import GradientState
    except ImportError:
        return True
    if not GradientState._shared_state:  # no Accelerator in this process
        return True
    return bool(GradientState().sync_gradients)


def deepspeed_engine(accelerator: Any) -> Any | None:
    """The DeepSpeed engine behind ``accelerator`` (or ``accelerator`` itself when it is one)."""
    if accelerator is None:
        return None
    if hasattr(accelerator, "zero_optimization_stage") and hasattr(accelerator, "backward"):
        return accelerator  # a deepspeed.DeepSpeedEngine
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is not None:
        return wrapped.engine
    kind = str(getattr(accelerator, "distributed_type", ""))
    if kind.endswith("DEEPSPEED"):
        raise ValueError(
            "the accelerator runs DeepSpeed but holds no engine yet: call "
            "accelerator.prepare(model, optimizer) before the first multi-objective step"
        )
    return None


def managed_by_deepspeed(params: Sequence[nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params)


def check_ddp_parameters(accelerator: Any, params: Sequence[nn.Parameter]) -> None:
    """A DDP model whose trainable parameters are not all in ``params`` would wait forever for
    the gradients the surrogate does not produce: refuse it with the names."""
    from torch.nn.parallel import DistributedDataParallel

    ours = {id(p) for p in params}
    for model in getattr(accelerator, "_models", []) or []:
        if not isinstance(model, DistributedDataParallel):
            continue
        named = [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]
        if not any(id(p) in ours for _, p in named):
            continue
        missing = [n for n, p in named if id(p) not in ours]
        if missing:
            raise ValueError(
                f"the DDP model has {len(missing)} trainable parameters that the engine does not "
                f"take gradients over (e.g. {missing[:3]}); gradient-level methods update only "
                f"the engine's parameters: pass all of the model's trainable parameters"
            )


# ------------------------------------------------------------------------------ DeepSpeed


def deepspeed_loss_scale(engine: Any) -> float:
    """The factor DeepSpeed multiplies a loss by in ``engine.backward`` (fp16 loss scaling;
    1 for bf16 / fp32)."""
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "scale_if_loss", None)
    if scale is None:
        return 1.0
    probe = torch.ones((), requires_grad=True)
    scaled = scale(probe)
    return float(scaled.detach()) if isinstance(scaled, Tensor) else 1.0


def deepspeed_group(engine: Any) -> Any:
    """The data-parallel group DeepSpeed partitions gradients over (None: the default group)."""
    for name in ("seq_data_parallel_group", "data_parallel_group"):
        group = getattr(engine, name, None)
        if group is not None:
            return group
    return None


class ZeroShards:
    """This rank's share of the reduced gradient of each parameter under DeepSpeed.

    * ZeRO-1/2: each parameter's gradient partition (``param._hp_mapping``): a contiguous
      fragment ``[start, start + numel)`` of the flattened parameter, or nothing;
    * ZeRO-3: ``safe_get_local_grad`` — the rank's partition of every parameter, without its
      padding (:meth:`zero3_partition`);
    * ZeRO-0 (DeepSpeed without ZeRO): the whole reduced ``param.grad`` (not sharded).

    ``read()`` concatenates them into one vector; the Gram of all ranks' vectors summed is the
    Gram of the full averaged gradients (the shards tile every parameter exactly once).
    """

    def __init__(self, engine: Any, params: Sequence[nn.Parameter]) -> None:
        self.engine = engine
        self.params = list(params)
        self.stage = int(engine.zero_optimization_stage())
        self.sharded = self.stage > 0

    # -- the local fragments
    def _fragment(self, param: nn.Parameter) -> tuple[Tensor | None, int]:
        """(local gradient fragment as a flat view, its start in the flattened parameter)."""
        if self.stage == 0:
            return (None if param.grad is None else param.grad.reshape(-1)), 0
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            grad = safe_get_local_grad(param)
            if grad is None:
                return None, 0
            start, count = self.zero3_partition(param)
            return grad.reshape(-1).narrow(0, 0, count), start
        if not hasattr(param, "_hp_mapping"):
            raise ValueError(
                "a parameter of the multi-objective engine is not managed by this DeepSpeed "
                "engine (no ZeRO gradient partition): pass the model's trainable parameters"
            )
        mapping = param._hp_mapping
        if mapping is None:
            return None, 0
        fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
        address = mapping.lp_fragment_address
        if fragment.numel() != address.numel:
            # The bf16 optimizer keeps a full accumulation buffer on every rank.
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment, int(address.start)

    @property
    def total(self) -> int:
        """The number of coordinates of all the parameters (ZeRO-3's partitioned parameters
        have ``numel() == 0`` outside their module's forward and backward: ``ds_numel``)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.params)

    @staticmethod
    def zero3_partition(param: nn.Parameter) -> tuple[int, int]:
        """ZeRO-3: ``(start, count)`` of the coordinates of the flattened parameter that this
        rank's partition holds. DeepSpeed splits every parameter into ``world`` partitions of
        ``ceil(numel / world)`` (``param.ds_tensor``), rank r's starting at ``r · size``; the
        last ones end in padding — or are nothing but padding — which ``count`` leaves out.
        The padding's gradient is never written by ZeRO-3's reduce-scatter (it stays at its
        initial zeros): reading it would add nothing to the Gram but would give ML2O's
        coordinate-wise network coordinates (and state rows) that do not exist."""
        size = int(param.ds_tensor.numel())
        start = dist.get_rank(getattr(param, "ds_process_group", None)) * size
        return start, max(0, min(size, int(param.ds_numel) - start))

    def read(self) -> Tensor:
        """This rank's fragments of every parameter's gradient, concatenated (float32)."""
        pieces = []
        for param in self.params:
            fragment, _ = self._fragment(param)
            if fragment is not None:
                pieces.append(fragment.float())
        if not pieces:
            return torch.zeros(0)
        return torch.cat(pieces)

    def zero(self) -> None:
        """Empty every gradient buffer the next per-objective backward would add to."""
        if self.stage in (1, 2):
            for param in self.params:
                fragment, _ = self._fragment(param)
                if fragment is not None:
                    fragment.zero_()
        self.engine.optimizer.zero_grad()
        for param in self.params:
            param.grad = None

    def masked_directions(self, local_direction: Tensor, world_size: int) -> list[Tensor]:
        """Full-shaped gradients holding ``world_size ×`` this rank's fragment of the update and
        zeros elsewhere: DeepSpeed's averaging of them over the ranks rebuilds the full update
        (every coordinate is owned by exactly one rank)."""
        if self.stage not in (1, 2):
            raise AssertionError("masked directions are for ZeRO-1/2")
        out, offset = [], 0
        for param in self.params:
            fragment, start = self._fragment(param)
            full = torch.zeros(param.numel(), dtype=local_direction.dtype, device=param.device)
            if fragment is not None:
                n = fragment.numel()
                full[start : start + n] = local_direction[offset : offset + n] * world_size
                offset += n
            out.append(full.view(param.shape))
        return out

    def write_zero3(self, local_direction: Tensor) -> None:
        """ZeRO-3: make ``local_direction`` (this rank's coordinates, in :meth:`read`'s order)
        this rank's reduced gradient partitions, the padding zero (it is never reduced into,
        so a value left there would stay in the optimizer's gradient norm and in every later
        read), with ``deepspeed.utils.safe_set_local_grad``."""
        from deepspeed.utils import safe_set_local_grad

        if self.stage != 3:
            raise AssertionError("write_zero3 is for ZeRO-3")
        offset = 0
        for param in self.params:
            _, count = self.zero3_partition(param)
            value = torch.zeros(
                param.ds_tensor.numel(), dtype=torch.float32, device=param.ds_tensor.device
            )
            value[:count] = local_direction[offset : offset + count]
            offset += count
            safe_set_local_grad(param, value)
        if offset != local_direction.numel():
            raise AssertionError("the update does not match this rank's ZeRO-3 partitions")


class WriteZero3Partitions(torch.autograd.Function):
    """``value`` in the forward; its backward writes ``grad_output · direction`` as this rank's
    ZeRO-3 gradient partitions and reaches no parameter (its only input needing a gradient is
    a fresh scalar leaf): how an update that is not a combination of the losses' gradients
    (ML2O / GML2O) reaches ZeRO-3's optimizer. See :func:`deliver_zero3`."""

    @staticmethod
    def forward(ctx, value: Tensor, anchor: Tensor, write: Any):
        ctx.write = write
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.write is None:
            raise RuntimeError("the ZeRO-3 update was already written (one backward per call)")
        ctx.write(grad_output)
        ctx.write = None
        return None, None, None


def deliver_zero3(value: Tensor, shards: ZeroShards, local_direction: Tensor) -> Tensor:
    """A scalar with ``value``'s value whose backward makes ``local_direction`` (times the
    backward's ``grad_output``: DeepSpeed's loss scale, the trainer's ``1 / accumulation``)
    this rank's ZeRO-3 gradient partitions; exact, with no further backward through the model.

    Why it is exact, from DeepSpeed 0.19.8's source: ``DeepSpeedEngine.backward(loss)`` runs
    ``loss.backward()`` and *then* ZeRO-3's gradient epilogue
    (``independent_gradient_partition_epilogue``: it reduce-scatters the last bucket of
    gradients into the partitions, ``partition_grads``, and points ``averaged_gradients`` at
    them); Accelerate's ``DeepSpeedEngineWrapper.backward`` follows it with
    ``engine.step()``, whose norm, clipping and update read those partitions. The scalar
    returned here reaches no parameter, so no gradient is reduced in that backward and the
    epilogue leaves the partitions as written; the m per-objective backward passes before it
    already ran ZeRO-3's hooks on the graph. Rejected alternatives: backpropagating
    ``0 · Σ L_i`` to keep ZeRO-3's reduction busy and writing the partitions just before
    ``optimizer.step`` (one more backward through the model, and DeepSpeed has no pre-step
    hook — only patching ``optimizer.step``); writing them from a callback queued on the
    autograd engine (it runs inside ``loss.backward()``, *before* that epilogue, whose
    reduction would overwrite them had any gradient arrived).

    So the scalar must be backpropagated alone — not summed with a loss of the parameters,
    whose reduction, copying into the partitions (ZeRO-3's first micro-batch), would overwrite
    the update in any order. It is the engine's single return value in every trainer here."""
    anchor = torch.zeros((), device=value.device, requires_grad=True)

    def write(grad_output: Tensor) -> None:
        shards.write_zero3(local_direction * grad_output.to(local_direction))

    return WriteZero3Partitions.apply(value, anchor, write)


class Zero3HookCounters:
    """ZeRO-3 gathers a module's parameters for its backward through counters that the first
    backward of a graph uses up; restoring them lets the retained graph be backpropagated again
    (one backward per objective). Private DeepSpeed attributes, checked on 0.19.8."""

    NAMES = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")

    def __init__(self, module: nn.Module) -> None:
        self.saved = []
        for sub in module.modules():
            values = {name: sub.__dict__[name] for name in self.NAMES if name in sub.__dict__}
            if values:
                self.saved.append((sub, values))
        if not self.saved:
            raise ValueError(
                "ZeRO-3: found none of DeepSpeed's backward hook counters on the model "
                f"({', '.join(self.NAMES)}); this DeepSpeed version is not supported by the "
                "gradient-level engine: use ZeRO-2, feature_level=True or a loss-level method"
            )

    def restore(self) -> None:
        for sub, values in self.saved:
            for name, value in values.items():
                setattr(sub, name, value)
