"""Run a multi-gradient method inside a training step.

A TRL / Accelerate training step computes a loss and calls ``accelerator.backward(loss)``;
gradient accumulation, mixed precision, clipping and DDP's / DeepSpeed's gradient reduction all
hang off that one call. The engine keeps that shape: given the m losses of a batch it returns
**one scalar to backward** whose gradient is the method's update::

    engine = MultiObjectiveEngine("mgda", adapter_parameters, accelerator=accelerator)
    loss = engine(losses, preference)          # inside compute_loss
    accelerator.backward(loss)                 # the trainer's usual step

How each kind of method gets there
----------------------------------
* **loss-level** (linear, (smooth) Tchebycheff, DWA, UW, FAMO, ...): the method's own scalar.
  Across processes, the method is evaluated at the *global* mean loss vector (m numbers
  all-reduced) and each process backpropagates its local losses with the method's
  coefficients there, ``c = ∂S/∂L (L̄)``: the averaged gradient is then exactly the gradient of
  S on the union of the batches, also for non-linear S (Tchebycheff), and stateful methods see
  the same losses on every process.
* **gradient-level** (MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL, UPGrad, EPO, DualProj,
  Aligned-MTL, ConFIG, GradVac, FairGrad, and the learned Gram-L2O): the per-objective
  gradients of ``parameters`` form ``J (m, P)``; the weights come from the Gram ``J Jᵀ``; the
  update ``d = wᵀ J`` is *injected*: the returned scalar has the value ``Σ w_i L_i`` and a
  custom backward that hands ``grad_output · d`` to the parameters (no second pass through the
  model — m backward passes in all, not m + 1). Because it arrives through the parameters'
  ``AccumulateGrad`` nodes like any gradient, it adds to accumulated gradients, is scaled by
  AMP's loss scale and by ``1 / accumulation_steps``, is clipped by the trainer, and fires the
  DDP / DeepSpeed reduction hooks.

  - one process / DDP: ``torch.autograd.grad`` per objective (it fires no DDP hook); the local
    ``J`` and the losses are averaged over processes in **one** all-reduce of an (m, P + 1)
    tensor, so every rank computes the same weights and the same ``d``. DDP then averages the
    injected ``d`` — identical values, so nothing is counted twice; it costs DDP's usual
    all-reduce of P numbers, which also keeps its bucket bookkeeping (and ``no_sync``) intact.
  - DeepSpeed ZeRO-0 (no sharding): as ZeRO-1/2 below for ``J`` (every rank reads the same
    reduced gradients), and the losses are averaged over the ranks (EPO and MGDA's loss
    normalisations read them), so every rank computes the same weights.
  - DeepSpeed ZeRO-1/2: ``torch.autograd.grad`` fails under ZeRO, so each objective is one
    ``engine.backward(L_i)`` (at a forced accumulation boundary, so ZeRO reduces it), this
    rank's gradient partition is read and cleared. The Gram is the all-reduced sum of the
    shard Grams (m² numbers); each rank forms its shard of ``d`` and injects it, times the world
    size, at its own coordinates: ZeRO's averaging in the trainer's backward rebuilds the full
    ``d`` with no extra collective.
  - DeepSpeed ZeRO-3: as ZeRO-2 for ``J`` and the Gram (the graph is backpropagated once per
    objective by restoring ZeRO-3's parameter-gathering counters in between), but the update is
    applied by backpropagating ``Σ w_i L_i`` once more (ZeRO-3's partitioned parameters cannot
    take an injected gradient): m + 1 backward passes.
* **update-level** (ML2O, GML2O: ``kind = "update"``, :mod:`align.mograd.learned`): the method
  needs every coordinate of ``J``, not only its Gram, and returns the update ``d`` itself; it
  runs like a gradient-level method on one process and under DDP (``J`` is all-reduced, so
  every rank computes the same ``d`` and advances the same recurrent state), ``d`` is injected
  the same way, and the returned scalar's value uses ``last_weights`` (d's coefficients on the
  gradients). Under DeepSpeed ZeRO-1/2/3 the network, being coordinate-wise, runs on each
  rank's gradient partition with that partition's recurrent state (its scales from the
  all-reduced Gram; the guard's m inner products and two norms all-reduced); the state is then
  per rank (:attr:`state_is_sharded`; the trainers save one file per rank, resumed with the
  same world size). ZeRO-1/2: each rank injects its part of ``d`` as for MGDA. ZeRO-3: the
  partitions are ``safe_get_local_grad``'s without their padding (``ceil(numel / world)`` per
  rank; the padding is neither fed to the network nor given state), and ``d`` — outside the
  gradients' span, so not reachable by the gradient-level path's extra backward of
  ``Σ w_i L_i`` — is written as this rank's reduced gradient partitions
  (``safe_set_local_grad``, padding zero) by the backward of the returned scalar, which reaches
  no parameter: ZeRO-3's gradient epilogue (after that backward) has nothing to reduce and the
  optimizer step reads ``d``; m backward passes, no more
  (:func:`~align.mograd.gradient_injection.deliver_zero3` says why this is exact, and that the
  scalar must then be backpropagated alone). ZeRO-0: as on one process. Not with
  ``feature_level=True`` (``NotImplementedError``).
* **feature-level** (``feature_level=True``, gradient-level methods; MGDA-UB, Sener & Koltun
  2018): the Gram is taken from the gradients w.r.t. a shared representation ``features=z``
  passed with each call (final hidden states, logits, per-token log-probs ...) through which
  every loss depends on the parameters. m cheap backward passes from the losses to z, then
  one backward through the model by the trainer: when every trainable parameter lies below z
  (checked on the graph), the returned scalar injects ``Σ w_i ∇_z L_i`` at z, so the part
  between the losses and z is not backpropagated again; otherwise it is ``Σ w_i L_i``.
  **An approximation**: for MGDA it
  minimises an upper bound of ‖Σ w_i g_i‖ (``g_i = (∂z/∂θ)ᵀ ∇_z L_i``), not the norm itself;
  the closer z is to the losses, the cheaper and the looser. Across processes the union
  batch's feature Gram is the sum of the local ones over ``world²`` (m² numbers).

Gradient accumulation (``accumulation=``)
-----------------------------------------
* ``"micro"`` (default): weights per micro-batch; the update of an optimizer step is the sum of
  the micro-batches' combined gradients.
* ``"full"``: per-objective gradients are accumulated over the k micro-batches of an optimizer
  step and the method runs once, at the last micro-batch (``accelerator.sync_gradients``, or
  ``sync=`` per call), on their mean — the Jacobian (and losses) of the whole effective batch;
  earlier micro-batches return a scalar with zero gradient. The last one injects ``k · d``,
  which the trainer's usual ``1 / k`` scaling of each micro-batch's loss turns into ``d``: exactly
  the method's update on the effective batch, also for methods whose update does not scale with
  J (Nash-MTL, FairGrad), as if the step were one big batch. Under DDP it also reduces ``J``
  once per optimizer step instead of once per micro-batch.

Support matrix
--------------
Each ✓ is a test in ``tests/test_mograd_engine.py`` that compares two CPU processes (gloo) with
one process on the union of their batches (LS, STCH, MGDA, and on DDP / ZeRO-2 also PBI, COSMOS,
DualProj, Aligned-MTL, ConFIG, GradVac, FairGrad; ZeRO-0: LS, MGDA, EPO and loss-normalised MGDA
with the ranks' weights compared too; ZeRO-1: LS and MGDA; Gram-L2O on ZeRO-2, and DDP / ZeRO-3
(slow), with the ranks' weights and state compared too: ``tests/test_mograd_gram_l2o.py``); "slow"
ones run with ``-m slow``; ~ = by construction, untested; ✗ = refused with an error.

==============  ============  ==========  ==================  ===================  ============
kind            one process   DDP         ZeRO-0 / ZeRO-1     ZeRO-2               ZeRO-3
==============  ============  ==========  ==================  ===================  ============
loss-level      ✓ exact       ✓           ✓ (slow)            ✓                    ✓ (slow)
gradient-level  ✓ m bwd       ✓ m bwd     ✓ (slow) m bwd      ✓ m bwd              ✓ (slow) m+1
feature-level   ✓ 1 bwd       ✓ (slow)    ~                   ✓ (slow)             ✓ (slow)
update-level    ✓ m bwd       ✓ m bwd     ~                   ✓ m bwd              ✓ m bwd
==============  ============  ==========  ==================  ===================  ============

(update-level: ``tests/test_mograd_ml2o.py``; GML2O's ZeRO-2 and ZeRO-3 tests also compare the
ranks' state partitions, put back in parameter order, with the one-process state — ZeRO-3 on
an adapter with 9-element tensors, so that partitions end in padding. Feature-level
update-level methods: ✗, ``NotImplementedError``.)

* Gradient accumulation: loss-level and feature-level weight each micro-batch, everywhere.
  Stateful loss-level methods (DWA, FAMO, a running ideal point, a nadir warm-up) are observed
  once per optimizer step, on the mean of the step's micro-batch losses (averaged over
  processes too), at the boundary after its last micro-batch (``observe="step"``).
  Gradient-level: ``"micro"`` on one process and DDP (✓ slow, with ``no_sync``); ``"full"`` on
  one process, DDP and ZeRO-0/1/2 (✓ slow for DDP and ZeRO-2). Under ZeRO, ``"micro"`` with more
  than one micro-batch per step is refused with an error (ZeRO reduces every micro-batch into
  one buffer that the per-objective backward passes would mix into); ZeRO-3 needs one
  micro-batch per step (its update is one more backward of the micro-batch's graph, or for
  ML2O / GML2O the write of the step's gradient partitions).
* AMP: bf16 autocast needs nothing. With an fp16 ``GradScaler`` (``accelerator=`` given) the
  per-objective gradients are taken of the scaled losses and divided back, and non-finite
  gradients pass through as a non-finite update, so the scaler skips the step and lowers its
  scale as it would for a plain loss (✓ one process). DeepSpeed's fp16 loss scale is divided
  out the same way (untested: DeepSpeed's CPU accelerator has no fp16).
* Clipping: applied by the trainer / DeepSpeed to the injected gradient like any gradient (the
  multi-process tests clip at 1.0 in every run).
* DDP with ``find_unused_parameters=True`` or ``static_graph=True``: not supported by
  gradient-level methods (the injection marks every parameter ready; DDP's unused-parameter
  search has already marked some). Accelerate's defaults are fine.
* Feature-level under DeepSpeed: the gradients w.r.t. ``z`` are taken under ``torch.func.vmap``
  so that DeepSpeed's backward hooks on the model outputs stand aside (a plain
  ``torch.autograd.grad`` would queue ZeRO's reduction on that graph and fail).
* Gradient checkpointing: gradient-level methods need the non-reentrant kind
  (``gradient_checkpointing_kwargs={"use_reentrant": False}``): ``torch.autograd.grad`` does not
  see the parameters inside a reentrant checkpoint, which is detected and refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from align.mograd import gradient_injection as D
from align.mograd.base import (
    GradientAggregator,
    LossAggregator,
    UpdateAggregator,
    check_losses,
)
from align.mograd.registry import get_aggregator

_ACCUMULATION = ("micro", "full")
_JACOBIAN = ("loop", "batched")
_OBSERVE = ("step", "manual")


class MultiObjectiveEngine:
    """Turns the m losses of a batch into the scalar a training step backpropagates.

    Args:
        aggregator: a method name (``"linear"``, ``"stch"``, ``"mgda"``, ...) or an instance.
        parameters: the trainable parameters the per-objective gradients are taken over (in
            practice the adapter's; under DDP, all the model's trainable parameters). Needed by
            gradient-level methods, unless ``feature_level=True``.
        accelerator: the ``accelerate.Accelerator`` (or a ``deepspeed.DeepSpeedEngine``): needed
            under DeepSpeed, and gives the fp16 loss scale and the accumulation boundary.
        feature_level: gradient-level methods only (ignored by loss-level ones): take the Gram
            from gradients w.r.t. the ``features=`` passed with each call (one backward
            through the model; an approximation, see the module notes).
        accumulation: ``"micro"`` or ``"full"`` (see the module notes).
        jacobian: ``"loop"`` (one ``autograd.grad`` per objective, least memory) or
            ``"batched"`` (one vmapped ``autograd.grad`` for all objectives).
        process_group: the data-parallel process group (default: the whole world).
        observe: stateful loss-level methods (DWA, FAMO, a running ideal point, a nadir
            warm-up): ``"step"`` (default) — the engine observes, once per optimizer step, the
            mean over the step's micro-batches of the losses it was called with, at the
            accumulation boundary, after that micro-batch's scalar (so the state is the same for
            every micro-batch of a step and step t sees the steps before it); ``"manual"`` — you
            call :meth:`observe` yourself (e.g. FAMO's paper protocol with the losses after the
            step on the same batch).
        **options: passed to the method's constructor.
    """

    def __init__(
        self,
        aggregator: str | LossAggregator | GradientAggregator = "linear",
        parameters: Iterable[nn.Parameter] | None = None,
        *,
        accelerator: Any = None,
        feature_level: bool = False,
        accumulation: str = "micro",
        jacobian: str = "loop",
        process_group: Any = None,
        observe: str = "step",
        **options: Any,
    ) -> None:
        self.aggregator = get_aggregator(aggregator, **options)
        if observe not in _OBSERVE:
            raise ValueError(f"observe must be one of {_OBSERVE}, got {observe!r}")
        self.observe_mode = observe
        self.parameters = [p for p in (parameters or []) if p.requires_grad]
        if accumulation not in _ACCUMULATION:
            raise ValueError(f"accumulation must be one of {_ACCUMULATION}, got {accumulation!r}")
        if jacobian not in _JACOBIAN:
            raise ValueError(f"jacobian must be one of {_JACOBIAN}, got {jacobian!r}")
        self.accelerator = accelerator
        if feature_level and self.is_update_level:
            raise NotImplementedError(
                f"{self.name} maps every coordinate of the per-objective gradients to the "
                f"update: it cannot run feature-level (feature_level=True)"
            )
        self.feature_level = bool(feature_level) and self.is_gradient_level
        self.accumulation = accumulation
        self.jacobian_mode = jacobian
        self.process_group = process_group
        if self.feature_level and accumulation == "full":
            raise ValueError(
                "feature_level=True weights each micro-batch (its features are gone by the last "
                "one): use accumulation='micro'"
            )
        if self.is_gradient_level and not self.feature_level and not self.parameters:
            raise ValueError(
                f"{self.aggregator.name} is a gradient-level method: pass the trainable "
                f"parameters its per-objective gradients are taken over (or feature_level=True "
                f"with features=)"
            )
        #: The weights of the last call (gradient-level: the method's w; loss-level: the
        #: method's effective weights), detached.
        self.last_weights: Tensor | None = None
        #: The m×m Gram matrix of the last gradient-level solve (global, detached).
        self.last_gram: Tensor | None = None
        self._pending: dict[str, Any] | None = None  # accumulation="full": sums so far
        self._step_losses: Tensor | None = None  # observe="step": this step's summed losses
        self._step_count = 0
        self._checked_ddp = False
        #: ML2O / GML2O under ZeRO-1/2/3: {"world_size", "rank", "size"} of the state's
        #: partition.
        self._sharded_state: dict[str, int] | None = None

    # ------------------------------------------------------------------------ properties
    @property
    def is_update_level(self) -> bool:
        """An update-level method (ML2O): J in, the update out."""
        return isinstance(self.aggregator, UpdateAggregator)

    @property
    def is_gradient_level(self) -> bool:
        """Needs the per-objective gradients (gradient- and update-level methods)."""
        return isinstance(self.aggregator, GradientAggregator) or self.is_update_level

    @property
    def name(self) -> str:
        return getattr(self.aggregator, "name", type(self.aggregator).__name__)

    def _world(self) -> tuple[Any, int]:
        return D.world(self.process_group)

    # -------------------------------------------------------------------------- the call
    def __call__(
        self,
        losses: Tensor,
        preference: Tensor | None = None,
        *,
        features: Tensor | Sequence[Tensor] | None = None,
        sync: bool | None = None,
    ) -> Tensor:
        """The scalar to backward for per-objective ``losses`` (shape (m,)) at α.

        ``features``: the shared representation, with ``feature_level=True``. ``sync``: whether
        this micro-batch ends an optimizer step (default: the accelerator's ``sync_gradients``,
        else True); ``accumulation="full"`` and the per-step observation of stateful loss-level
        methods use it.
        """
        losses = check_losses(losses, f"MultiObjectiveEngine({self.name})")
        if not self.is_gradient_level:
            boundary = D.sync_gradients(self.accelerator) if sync is None else bool(sync)
            return self._loss_level(losses, preference, boundary)
        if not losses.requires_grad:
            raise ValueError(
                f"MultiObjectiveEngine({self.name}): none of the losses requires grad — they "
                f"must be computed from the trainable parameters (not under torch.no_grad)"
            )
        if self.feature_level:
            return self._feature_level(losses, preference, features)
        boundary = D.sync_gradients(self.accelerator) if sync is None else bool(sync)
        engine = D.deepspeed_engine(self.accelerator)
        if engine is None and D.managed_by_deepspeed(self.parameters):
            raise ValueError(
                "the parameters are managed by DeepSpeed ZeRO: pass accelerator= (the "
                "Accelerator that prepared the model, or the DeepSpeed engine) to the engine"
            )
        if engine is not None:
            return self._gradient_level_deepspeed(engine, losses, preference, boundary)
        return self._gradient_level_local(losses, preference, boundary)

    # ------------------------------------------------------------------------ loss-level
    def _loss_level(self, losses: Tensor, preference: Tensor | None, boundary: bool) -> Tensor:
        group, size = self._world()
        if size == 1:
            loss = self.aggregator(losses, preference)
            self.last_weights = self.aggregator.last_weights
            self._observe_step(losses, boundary)
            return loss
        # The method at the global mean losses; locally, its coefficients times the local
        # losses: the average over processes of the gradient is that of S on the union batch.
        mean = D.all_reduce_sum(losses.detach().float().clone(), group) / size
        point = mean.to(losses.dtype).requires_grad_(True)
        value = self.aggregator(point, preference)
        self.last_weights = self.aggregator.last_weights
        (coefficients,) = torch.autograd.grad(value, point, retain_graph=True)
        self._observe_step(mean, boundary)  # already the mean over processes: no collective
        return value + (coefficients.detach() * (losses - losses.detach())).sum()

    @property
    def _stateful(self) -> bool:
        """A loss-level method with something to observe (DWA, FAMO, Tchebycheff's references)."""
        cls = type(self.aggregator)
        return isinstance(self.aggregator, LossAggregator) and (
            cls.observe is not LossAggregator.observe
            or cls.observe_step is not LossAggregator.observe_step
        )

    def _observe_step(self, losses: Tensor, boundary: bool) -> None:
        """observe="step": add this micro-batch's losses (global means across processes) to the
        step's; at the boundary, after the micro-batch was combined, the method observes their
        mean over the step's micro-batches — once per optimizer step."""
        if self.observe_mode != "step" or not self._stateful:
            return
        values = losses.detach().to(torch.float64).reshape(-1)
        if self._step_losses is None:
            self._step_losses, self._step_count = values.clone(), 1
        elif self._step_losses.shape != values.shape:
            raise ValueError("the number of objectives changed within an optimizer step")
        else:
            self._step_losses += values
            self._step_count += 1
        if boundary:
            mean = self._step_losses / self._step_count
            self._step_losses, self._step_count = None, 0
            self.aggregator.observe_step(mean)

    # ------------------------------------------------------------------- gradient-level
    def _weights(self, gram: Tensor, losses: Tensor, preference: Tensor | None) -> Tensor:
        weights = self.aggregator.weights(gram, losses=losses, preference=preference)
        self.last_gram = gram.detach()
        self.last_weights = weights.detach()
        return weights.detach()

    def _scaling_skip(self, gram: Tensor, m: int, scaled: bool) -> Tensor | None:
        """Non-finite gradients: with loss scaling, uniform weights (a non-finite update makes
        the scaler skip the step and lower its scale); without, a clear error."""
        if torch.isfinite(gram).all():
            return None
        if scaled:
            self.last_weights = None
            return torch.full((m,), 1.0 / m, dtype=gram.dtype, device=gram.device)
        bad = [i for i in range(m) if not torch.isfinite(gram[i, i])]
        raise ValueError(
            f"{self.name}: the gradients of objective(s) {bad} are not finite (NaN/inf losses or "
            f"an overflow); with fp16, use a loss scaler (accelerate's mixed_precision='fp16')"
        )

    def _jacobian(
        self,
        losses: Tensor,
        inputs: Sequence[Tensor],
        scale: float,
        batched: bool,
        functorch: bool = False,
    ) -> Tensor:
        """``(m, N)`` float32: row i is ∇ L_i w.r.t. ``inputs`` (flattened, concatenated), taken
        of ``scale · L_i`` (AMP) and divided back. A loss that does not depend on the inputs
        gets a zero row."""
        m, total = losses.numel(), sum(x.numel() for x in inputs)
        live = [i for i in range(m) if losses.requires_grad and losses[i].requires_grad]
        if not live:
            return torch.zeros(m, total, dtype=torch.float32, device=inputs[0].device)
        # Not zero-filled: every segment is written below or zeroed at the end (for logits as
        # features, a zero fill of J is a measurable share of the step).
        jacobian = torch.empty(m, total, dtype=torch.float32, device=inputs[0].device)
        written = [[False] * len(inputs) for _ in range(m)]
        reached = [False] * len(inputs)
        try:
            if batched:
                # One vmapped backward for all objectives.
                seeds = torch.zeros(len(live), m, dtype=losses.dtype, device=losses.device)
                seeds[torch.arange(len(live)), live] = scale
                if functorch:
                    # DeepSpeed's hooks on the model outputs stand aside under torch.func
                    # transforms (not under autograd.grad's own is_grads_batched).
                    def vjp(seed: Tensor) -> tuple[Tensor, ...]:
                        out = torch.autograd.grad(
                            losses, list(inputs), seed, retain_graph=True, allow_unused=True
                        )
                        return tuple(
                            g if g is not None else torch.zeros_like(x) for g, x in zip(out, inputs)
                        )

                    grads = torch.func.vmap(vjp)(seeds)
                else:
                    grads = torch.autograd.grad(
                        losses,
                        list(inputs),
                        grad_outputs=seeds,
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                offset = 0
                for k, (g, x) in enumerate(zip(grads, inputs)):
                    n = x.numel()
                    if g is not None:
                        jacobian[live, offset : offset + n] = g.reshape(len(live), n).float()
                        reached[k] = True
                        for i in live:
                            written[i][k] = True
                    offset += n
            else:
                for i in live:
                    grads = torch.autograd.grad(
                        losses[i] * scale if scale != 1.0 else losses[i],
                        list(inputs),
                        retain_graph=True,
                        allow_unused=True,
                    )
                    offset = 0
                    for k, (g, x) in enumerate(zip(grads, inputs)):
                        n = x.numel()
                        if g is not None:
                            jacobian[i, offset : offset + n].copy_(g.reshape(-1))
                            reached[k] = written[i][k] = True
                        offset += n
        except RuntimeError as error:
            if "heckpoint" in str(error):
                raise ValueError(self._reentrant_message()) from error
            raise
        if not all(reached) and _has_reentrant_checkpoint(losses):
            # autograd.grad silently returns None for parameters inside a reentrant checkpoint.
            raise ValueError(self._reentrant_message())
        offsets = [0]
        for x in inputs:
            offsets.append(offsets[-1] + x.numel())
        for i in range(m):
            for k in range(len(inputs)):
                if not written[i][k]:
                    jacobian[i, offsets[k] : offsets[k + 1]].zero_()
        if scale != 1.0:
            jacobian /= scale
        return jacobian

    def _reentrant_message(self) -> str:
        return (
            f"{self.name}: per-objective gradients cannot reach parameters inside reentrant "
            f"gradient checkpointing (torch.autograd.grad sees none): use the non-reentrant "
            f"kind (gradient_checkpointing_kwargs={{'use_reentrant': False}}) or "
            f"feature_level=True with features after the checkpointed layers"
        )

    def _gradient_level_local(
        self, losses: Tensor, preference: Tensor | None, boundary: bool
    ) -> Tensor:
        params, m = self.parameters, losses.numel()
        group, size = self._world()
        if size > 1 and not self._checked_ddp and self.accelerator is not None:
            D.check_ddp_parameters(self.accelerator, params)
            self._checked_ddp = True
        scale = D.grad_scale(self.accelerator)
        # J with the losses as one extra column: one collective carries both.
        jacobian = self._jacobian(
            losses, params, scale or 1.0, batched=self.jacobian_mode == "batched"
        )
        stacked = torch.cat([jacobian, losses.detach().float().reshape(m, 1)], dim=1)
        count = 1
        if self.accumulation == "full":
            stacked = self._accumulate(stacked)
            if not boundary:
                return self._zero_update(losses, params)
            count = self._pop_pending()  # the stack is now the effective batch's mean J
        if size > 1:
            D.all_reduce_sum(stacked, group)
            stacked /= size
        jacobian, mean_losses = stacked[:, :-1], stacked[:, -1]
        gram = (jacobian @ jacobian.T).double()
        weights = self._scaling_skip(gram, m, scale is not None)
        if weights is None and self.is_update_level:
            # J in, d out; the value of the returned scalar uses d's weights on the gradients.
            direction = self.aggregator(jacobian, losses=mean_losses, preference=preference)
            self.last_gram = gram.detach()
            self.last_weights = self.aggregator.last_weights
            coefficients = self.last_weights
            if coefficients is None or coefficients.numel() != m:
                coefficients = torch.full((m,), 1.0 / m)
            value = (coefficients.to(losses) * losses.detach()).sum()
            direction = direction.to(jacobian) * count
            return D.inject(value, params, D.split_like(direction, params))
        if weights is None:
            weights = self._weights(gram, mean_losses, preference)
        direction = (weights.to(jacobian) @ jacobian) * count
        value = (weights.to(losses) * losses.detach()).sum()
        return D.inject(value, params, D.split_like(direction, params))

    def _accumulate(self, stacked: Tensor) -> Tensor:
        """accumulation="full": the sum of this optimizer step's (local) stacks so far; at the
        boundary the caller gets the total and the buffer is emptied."""
        if self._pending is None:
            self._pending = {"stack": stacked.clone(), "count": 1}
        else:
            if self._pending["stack"].shape != stacked.shape:
                raise ValueError("the number of objectives changed within an optimizer step")
            self._pending["stack"] += stacked
            self._pending["count"] += 1
        return self._pending["stack"]

    def _zero_update(self, losses: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
        """A micro-batch before the boundary (accumulation="full"): zero gradient (explicit
        zeros, so that a DDP reducer that does expect gradients gets them)."""
        weights = self.last_weights
        if weights is None or weights.numel() != losses.numel():
            weights = torch.full_like(losses.detach(), 1.0 / losses.numel())
        value = (weights.to(losses) * losses.detach()).sum()
        return D.inject(value, params, [torch.zeros_like(p) for p in params])

    def _pop_pending(self) -> int:
        """At the boundary: the summed stack becomes the mean over the step's micro-batches (the
        effective batch's per-objective gradients and losses, when the micro-batches are of equal
        size); returns their number k.

        The method runs on that mean, and the caller injects ``k · d``: the trainer scales every
        micro-batch's scalar by ``1 / k`` (transformers, Accelerate and DeepSpeed alike), so the
        step's gradient is exactly ``d``, the method's update on the effective batch. Methods
        whose update does not scale with J (Nash-MTL, FairGrad) need the mean, not the sum."""
        count = self._pending["count"]
        self._pending["stack"] /= count
        self._pending = None
        return count

    # ------------------------------------------------------------------------- DeepSpeed
    def _gradient_level_deepspeed(
        self, engine: Any, losses: Tensor, preference: Tensor | None, boundary: bool
    ) -> Tensor:
        params, m = self.parameters, losses.numel()
        shards = D.ZeroShards(engine, params)
        steps = int(engine.gradient_accumulation_steps())
        if shards.stage == 3 and (steps > 1 or self.accumulation == "full"):
            if self.is_update_level:
                how = "writes its update as the step's gradient partitions"
                instead = "use ZeRO-1/2 or a larger micro-batch"
            else:
                how = "applies its update by one more backward of the micro-batch"
                instead = "use ZeRO-2, feature_level=True or a loss-level method, or a larger "
                instead += "micro-batch"
            raise ValueError(
                f"{self.name} under ZeRO-3 {how}, so it needs gradient_accumulation_steps = 1 "
                f"(got {steps}, accumulation={self.accumulation!r}); {instead}"
            )
        if self.accumulation == "micro" and (steps > 1 or not boundary):
            raise ValueError(
                f"{self.name} under DeepSpeed ZeRO with gradient accumulation "
                f"({steps} micro-batches per step) needs accumulation='full': ZeRO reduces every "
                f"micro-batch into one buffer that the per-objective backward passes would mix "
                f"into"
            )
        group = D.deepspeed_group(engine)
        _, size = D.world(group)
        scale = D.deepspeed_loss_scale(engine)
        counters = D.Zero3HookCounters(engine.module) if shards.stage == 3 else None
        previous = getattr(engine, "_is_gradient_accumulation_boundary", None)
        rows: list[Tensor] = []
        engine.set_gradient_accumulation_boundary(True)  # ZeRO reduces each objective now
        try:
            for i in range(m):
                if counters is not None and i > 0:
                    counters.restore()
                if not losses[i].requires_grad:
                    rows.append(None)
                    continue
                engine.backward(losses[i], retain_graph=True, scale_wrt_gas=False)
                rows.append(shards.read())
                shards.zero()
        finally:
            engine.set_gradient_accumulation_boundary(previous)
        width = max((r.numel() for r in rows if r is not None), default=0)
        device = params[0].device
        jacobian = torch.stack(
            [r if r is not None else torch.zeros(width, device=device) for r in rows]
        ).to(device)
        if scale != 1.0:
            jacobian /= scale
        if self.accumulation == "full":
            summed = self._accumulate(
                torch.cat([jacobian, losses.detach().float().reshape(m, 1)], dim=1)
            )
            if not boundary:
                directions = (
                    shards.masked_directions(torch.zeros(width, device=device), size)
                    if shards.stage in (1, 2)
                    else [torch.zeros_like(p) for p in params]
                )
                value = (torch.full_like(losses.detach(), 1.0 / m) * losses.detach()).sum()
                return D.inject(value, params, directions)
            count = self._pop_pending()  # the effective batch's mean J (see _pop_pending)
            jacobian, local_losses = summed[:, :-1], summed[:, -1]
        else:
            count = 1
            local_losses = losses.detach().float()
        # The Gram of the averaged gradients: the shard Grams summed over ranks (m² numbers);
        # the losses ride along in the same collective. ZeRO-0 does not shard: every rank holds
        # the same reduced J, so its Gram is not summed, but the losses (local) still are, so
        # that methods reading them (EPO, MGDA's loss normalisations) agree on every rank.
        packed = torch.cat([(jacobian @ jacobian.T).reshape(-1), local_losses])
        if size > 1:
            D.all_reduce_sum(packed, group)
            if not shards.sharded:
                packed[: m * m] /= size
            mean_losses = packed[m * m :] / size
        else:
            mean_losses = packed[m * m :]
        gram = packed[: m * m].reshape(m, m).double()
        weights = self._scaling_skip(gram, m, scale != 1.0)
        if weights is None and self.is_update_level:
            return self._update_level_deepspeed(
                shards, jacobian, gram, mean_losses, preference, losses, count, group, size
            )
        if weights is None:
            weights = self._weights(gram, mean_losses, preference)
        value = (weights.to(losses) * losses.detach()).sum()
        if shards.stage == 3:
            counters.restore()  # the trainer's backward goes through the graph once more
            return (weights.to(losses) * losses).sum()
        local_direction = (weights.to(jacobian) @ jacobian) * count
        if shards.stage == 0:
            return D.inject(value, params, D.split_like(local_direction, params))
        return D.inject(value, params, shards.masked_directions(local_direction, size))

    def _update_level_deepspeed(
        self,
        shards: D.ZeroShards,
        jacobian: Tensor,
        gram: Tensor,
        mean_losses: Tensor,
        preference: Tensor | None,
        losses: Tensor,
        count: int,
        group: Any,
        size: int,
    ) -> Tensor:
        """ML2O / GML2O under DeepSpeed. ZeRO-0: every rank holds the same reduced J, so the
        method runs on it as on one process. ZeRO-1/2/3: the network is coordinate-wise, so each
        rank runs it on its own gradient partition (ZeRO-3: without the partitions' padding)
        with that partition's recurrent state; the scales come from the all-reduced Gram, and
        the guard's inner products and norms are all-reduced (m + 2 numbers). ZeRO-1/2: each
        rank injects its part of d as ZeRO-2 does for MGDA. ZeRO-3: each rank writes its part
        of d as its gradient partitions when the returned scalar is backpropagated
        (:func:`~align.mograd.gradient_injection.deliver_zero3`, which says why that is
        exact): no further backward through the model, m backward passes in all."""
        params, m = self.parameters, jacobian.shape[0]
        self.last_gram = gram.detach()
        if shards.stage == 0:
            direction = self.aggregator(jacobian, losses=mean_losses, preference=preference)
        else:

            def all_reduce(tensor: Tensor) -> Tensor:
                return D.all_reduce_sum(tensor, group) if size > 1 else tensor

            total = shards.total  # ZeRO-3's partitioned parameters have numel() 0
            direction = self.aggregator.compute_update_sharded(jacobian, gram, total, all_reduce)
            self._sharded_state = {"world_size": size, "rank": D.rank(group), "size": total}
        self.last_weights = self.aggregator.last_weights
        coefficients = self.last_weights
        if coefficients is None or coefficients.numel() != m:
            coefficients = torch.full((m,), 1.0 / m)
        value = (coefficients.to(losses) * losses.detach()).sum()
        direction = direction.to(jacobian) * count
        if shards.stage == 0:
            return D.inject(value, params, D.split_like(direction, params))
        if shards.stage == 3:
            return D.deliver_zero3(value, shards, direction)
        return D.inject(value, params, shards.masked_directions(direction, size))

    @property
    def state_is_sharded(self) -> bool:
        """Whether the method's state is this rank's partition (ML2O / GML2O under ZeRO-1/2/3):
        each rank must then save and restore its own ``state_dict``, with the same world size."""
        return self._sharded_state is not None

    # ----------------------------------------------------------------------- feature-level
    def _feature_level(
        self,
        losses: Tensor,
        preference: Tensor | None,
        features: Tensor | Sequence[Tensor] | None,
    ) -> Tensor:
        if features is None:
            raise ValueError(
                "feature_level=True: pass features= (the shared representation every loss "
                "depends on, e.g. the final hidden states or the logits) with each call"
            )
        feats = [features] if isinstance(features, Tensor) else list(features)
        if not feats or not all(isinstance(f, Tensor) and f.requires_grad for f in feats):
            raise ValueError("features must be tensors that require grad (part of the graph)")
        m = losses.numel()
        scale = D.grad_scale(self.accelerator) or 1.0
        # Under DeepSpeed, a plain autograd.grad through the model outputs would run
        # DeepSpeed's backward prologue and queue its gradient reduction on that graph task;
        # under torch.func.vmap it stands aside.
        deepspeed = D.deepspeed_engine(self.accelerator) is not None
        jacobian = self._jacobian(
            losses,
            feats,
            scale,
            batched=deepspeed or self.jacobian_mode == "batched",
            functorch=deepspeed,
        )
        group, size = self._world()
        packed = torch.cat([(jacobian @ jacobian.T).reshape(-1), losses.detach().float()])
        if size > 1:
            # Each process's features are its own examples: the union's feature Jacobian is the
            # concatenation, and the union loss the mean, so G = Σ_r G_r / size².
            D.all_reduce_sum(packed, group)
            packed[: m * m] /= size * size
            packed[m * m :] /= size
        gram = packed[: m * m].reshape(m, m).double()
        weights = self._scaling_skip(gram, m, scale != 1.0)
        if weights is None:
            weights = self._weights(gram, packed[m * m :], preference)
        if not _features_are_a_bottleneck(losses, feats):
            # A trainable parameter between the features and the losses: its gradient needs
            # the losses' own backward.
            return (weights.to(losses) * losses).sum()
        # Every trainable parameter is reached through the features only: start the backward
        # at them with Σ w_i ∇_z L_i, already computed — the part of the graph between the
        # losses and the features is not backpropagated again.
        direction = weights.to(jacobian) @ jacobian
        value = (weights.to(losses) * losses.detach()).sum()
        return D.inject(value, feats, D.split_like(direction, feats))

    # -------------------------------------------------------------------------- the rest
    def observe(self, losses: Tensor) -> None:
        """``observe="manual"``: pass (detached) losses to a stateful loss-level method's
        ``observe`` now. Across processes, call it on every process: the losses are averaged
        first, so the state stays the same everywhere. With ``observe="step"`` (the default) the
        engine observes each optimizer step itself, and calling this is an error for a stateful
        method (it would count the step twice); for a stateless one it does nothing."""
        if not isinstance(self.aggregator, LossAggregator):
            return
        if type(self.aggregator).observe is LossAggregator.observe:
            return  # stateless (linear, ...): no per-step all-reduce for nothing
        if self.observe_mode == "step":
            raise ValueError(
                f"MultiObjectiveEngine({self.name}) observes every optimizer step's mean losses "
                f"itself (observe='step'); build it with observe='manual' to call observe()"
            )
        losses = torch.as_tensor(losses).detach()
        group, size = self._world()
        if size > 1:
            losses = D.all_reduce_sum(losses.float().clone(), group) / size
        self.aggregator.observe(losses)

    def state_dict(self) -> dict[str, Any]:
        """The method's state. Sharded (ML2O / GML2O under ZeRO-1/2/3) it is this rank's
        partition, tagged with the world size and rank (:attr:`state_is_sharded`)."""
        state = {"aggregator": self.aggregator.state_dict()}
        if self._sharded_state is not None:
            state["shard"] = dict(self._sharded_state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shard = state.get("shard")
        if shard is not None:
            _, size = self._world()
            rank = D.rank(self.process_group)
            if (shard["world_size"], shard["rank"]) != (size, rank):
                raise ValueError(
                    f"{self.name}: this state is rank {shard['rank']}'s partition of a "
                    f"{shard['world_size']}-process ZeRO run; resume with the same world size, "
                    f"each rank loading its own (this is rank {rank} of {size})"
                )
            self._sharded_state = dict(shard)
        self.aggregator.load_state_dict(state["aggregator"])


def _has_reentrant_checkpoint(losses: Tensor) -> bool:
    """Whether the graph behind ``losses`` holds a reentrant checkpoint node."""
    stack, seen = [losses.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "CheckpointFunction" in type(node).__name__:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _features_are_a_bottleneck(losses: Tensor, features: Sequence[Tensor]) -> bool:
    """Whether every path from the losses to a trainable leaf passes through the features."""
    stops = {id(f.grad_fn) for f in features if f.grad_fn is not None}
    leaves = {id(f) for f in features if f.grad_fn is None}
    stack, seen = [losses.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in stops:
            continue
        seen.add(id(node))
        if type(node).__name__ == "AccumulateGrad":
            if id(node.variable) not in leaves:
                return False
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return True
