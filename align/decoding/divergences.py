r"""MOD's mixing rules: the next-token distribution of m policies combined with weights α under
each f-divergence of Shi et al. 2024 ("Decoding-time language model alignment with multiple
objectives", the closed form of §4 obtained by the Legendre transform).

**Derivation.** Let each policy π_i be the optimum of its own reward under an f-regularised
objective, ``π_i = argmax_π E_π[r_i] − β D_f(π‖π_ref)`` with
``D_f(π‖π_ref) = Σ_y π_ref(y) f(π(y)/π_ref(y))``, f strictly convex with ``f'(0+) = −∞`` (so
every optimum is interior and is given by its first-order condition on the simplex). That
condition reads ``β f'(π_i/π_ref) = r_i − λ_i`` (λ_i the multiplier of Σ_y π = 1). The policy
that is optimal for the weighted reward ``Σ_i α_i r_i`` (Σ α_i = 1) satisfies
``β f'(π*/π_ref) = Σ_i α_i r_i − λ*``; substituting each r_i gives MOD's rule

    f'(π*(y)/π_ref(y)) = u(y) − Z,   u(y) = Σ_i α_i f'(π_i(y)/π_ref(y)),
    π*(y) = π_ref(y) · (f')⁻¹(u(y) − Z),

where Z is the one number for which π* sums to 1. For the reverse KL (f = x log x, f' = log x + 1)
π_ref cancels and Z is a log-sum-exp: ``π* ∝ Π_i π_i^{α_i}``, the linear mixing of log-probs
align has always done. For every other f, π_ref stays (align uses the base model, the policy the
objectives were aligned from) and Z has no closed form. Write Z = max_y u(y) + s (f' shifted so
that sup f' = 0, as below): ``Σ_y π*(y; s)`` falls from +∞ (s → 0, the top token's pole) to at
most 1 at ``H(s) = 1`` (every ratio π*/π_ref <= 1), where H = (f')⁻¹(−·) is decreasing and
convex. So log s is bracketed, and Newton's method on ``log Σ π* = 0`` in log s, kept inside the
bracket (bisection where it would leave it), finds it in a few steps from ``Z = 0`` in f's own
constants — the authors' rule, exact when the policies agree. It runs in float64, per row, with
every token in the sum (no token's mass exceeds 1 anywhere in the bracket: nothing overflows).

The forms (constants of f' dropped into Z; ρ_i = π_i / π_ref):

* ``reverse_kl``: f(x) = x log x — ``log π* = Σ α_i log π_i − log Z``;
* ``forward_kl``: f(x) = −log x, f'(x) = −1/x — ``π*(y) = 1 / (Σ_i α_i / π_i(y) + Z / π_ref(y))``;
* ``jensen_shannon``: f(x) = x log x − (1 + x) log((1 + x) / 2), f'(x) = log(2x / (1 + x)) —
  with q = ρ / (1 + ρ) = π / (π + π_ref): ``q*(y) = e^{−Z} Π_i q_i(y)^{α_i}``,
  ``π*(y) = π_ref(y) q*(y) / (1 − q*(y))``;
* ``alpha`` (order a > 0): f(x) = (x^{1−a} − (1 − a) x − a) / (a (a − 1)),
  f'(x) = (1 − x^{−a}) / a — ``π*(y) = π_ref(y) (Σ_i α_i ρ_i(y)^{−a} + Z)^{−1/a}``;
  a = 1 is the forward KL, a → 0 the reverse KL.

The authors' code applies these forms with Z (and π_ref) left out, which is exact only when the
policies agree, and the Jensen-Shannon one as the reverse KL; here Z is solved for.
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jensen_shannon", "alpha")

#: Log-probabilities below this are "never" (a finite floor, as the decoder's scores use).
LOG_FLOOR = -1e9
#: π_ref's log-probs are floored here (divided by an α-divergence's order a > 1: float64 still
#: holds e^-700), so that every token keeps a ratio π/π_ref.
REFERENCE_FLOOR = -700.0


def check_divergence(divergence: str, divergence_alpha: float | None = None) -> float | None:
    """Validate a divergence and its order; returns the order (None unless ``alpha``)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"MOD divergence must be one of {list(DIVERGENCES)}, got {divergence!r}")
    if divergence != "alpha":
        if divergence_alpha is not None:
            raise ValueError(
                f"divergence_alpha (the order of an α-divergence) is for divergence 'alpha' only, "
                f"got it with {divergence!r}"
            )
        return None
    try:
        order = float(divergence_alpha)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            "divergence 'alpha' needs its order divergence_alpha > 0 (1: forward KL, → 0: "
            f"reverse KL), got {divergence_alpha!r}"
        ) from None
    if not (math.isfinite(order) and order > 0):
        raise ValueError(f"divergence_alpha must be a finite number > 0, got {divergence_alpha!r}")
    return order


def _add_derivative(u, weight, log_ratio, spare, divergence, order) -> None:
    """``u += weight · f'(ρ)`` from log ρ (``log_ratio`` and ``spare`` are overwritten), f'
    shifted so that its supremum is 0. Exponents are capped: a token some policy all but rules
    out gets u ≈ −1e304, mass 0. In place throughout (big fresh tensors cost page faults)."""
    if divergence == "jensen_shannon":  # log(ρ / (1 + ρ)) = min(t, 0) − log(1 + e^−|t|)
        torch.abs(log_ratio, out=spare).neg_().exp_().log1p_()
        u.addcmul_(log_ratio.clamp_(max=0.0).sub_(spare), weight)
        return
    scale = 1.0 if divergence == "forward_kl" else order
    log_ratio.mul_(-scale).clamp_(max=700.0).exp_()
    u.addcmul_(log_ratio, weight, value=-1.0 / scale)


def _ratio_(x: torch.Tensor, slope: torch.Tensor | None, divergence, order) -> None:
    """``x ← H(x)`` and (unless None) ``slope ← −H'(x)``, in place, for x > 0: ``H(x) =
    (f')⁻¹(−x)`` is the ratio π*/π_ref of a token whose ``u − Z`` is −x (decreasing, convex,
    +∞ at 0)."""
    if divergence == "forward_kl":
        x.reciprocal_()
        if slope is not None:
            torch.mul(x, x, out=slope)
    elif divergence == "alpha":  # (a x)^(−1/a), its slope H / (a x)
        x.mul_(order)
        if slope is not None:
            slope.copy_(x)
        x.log_().mul_(-1.0 / order).exp_()
        if slope is not None:
            torch.div(x, slope, out=slope)
    else:  # jensen_shannon: 1 / (e^x − 1), its slope H (1 + H)
        x.expm1_().reciprocal_()
        if slope is not None:
            torch.add(x, 1.0, out=slope).mul_(x)


def _unit_offset_(log_p: torch.Tensor, divergence: str, order: float | None) -> torch.Tensor:
    """``log_p ← H⁻¹(1/p)`` in place: the x at which ``p · H(x) = 1``."""
    if divergence == "forward_kl":
        return log_p.exp_()
    if divergence == "alpha":
        return log_p.mul_(order).exp_().div_(order)
    return log_p.exp_().log1p_()


def mix_policies(
    log_probs: torch.Tensor,
    weights: torch.Tensor,
    reference: torch.Tensor | None = None,
    divergence: str = "reverse_kl",
    divergence_alpha: float | None = None,
    *,
    iterations: int = 100,
    tolerance: float = 1e-12,
) -> torch.Tensor:
    """MOD's next-token log-probabilities ``log π*`` (rows, V), normalised.

    ``log_probs`` (rows, m, V): each policy's normalised log-probs; ``weights`` (rows, m): α per
    row; ``reference`` (rows, V): π_ref's log-probs (needed by every form but ``reverse_kl``).
    A row whose α is a vertex returns that policy's log-probs as they are.
    """
    order = check_divergence(divergence, divergence_alpha)
    if log_probs.dim() != 3 or weights.shape != log_probs.shape[:2]:
        raise ValueError(
            f"log_probs must be (rows, m, V) and weights (rows, m), got {tuple(log_probs.shape)} "
            f"and {tuple(weights.shape)}"
        )
    weights = weights.to(log_probs.device, log_probs.dtype)
    used = weights > 0
    if divergence == "reverse_kl":
        mixed = (torch.where(used[..., None], weights[..., None] * log_probs, 0.0)).sum(1)
        return torch.log_softmax(mixed, dim=-1)
    if reference is None:
        raise ValueError(f"MOD's {divergence} form needs the reference policy's log-probs")
    w = weights.double()
    # π_ref > 0 on every token, and π_ref^a too (a floored log-prob would make the
    # normaliser's pole vanish).
    floor = REFERENCE_FLOOR / max(1.0, order or 1.0)
    ref = reference.to(torch.float64, copy=True).clamp_(min=floor)
    u = torch.zeros_like(ref)  # Σ_i α_i f'(π_i / π_ref) per token, <= 0
    one, two = torch.empty_like(ref), torch.empty_like(ref)
    for i in range(log_probs.shape[1]):
        if bool(used[:, i].any()):
            one.copy_(log_probs[:, i]).sub_(ref)
            _add_derivative(u, w[:, i : i + 1], one, two, divergence, order)
    # Z = max_y u(y) + s with s > 0: a token's u − Z is −(gap + s), exactly −s at the top.
    top = u.amax(-1, keepdim=True)
    gap = u.neg_().add_(top)
    # Bracket log s: at s = H⁻¹(1) every token has ratio <= 1 (total mass <= 1); at the largest
    # s where some token alone has mass 1, the total is >= 1 (and no token's mass exceeds 1 at
    # any s above it: the search never overflows).
    high = torch.full_like(
        gap[:, :1], math.log(float(_unit_offset_(torch.zeros(()), divergence, order)))
    )
    low = _unit_offset_(one.copy_(ref), divergence, order).sub_(gap).amax(-1, keepdim=True).log_()
    low = torch.minimum(low, high)
    p_ref = ref.exp_()
    # Start where Z = 0 in f's own constants (the authors' rule, exact when the policies
    # agree), inside the bracket.
    sigma = torch.maximum(torch.minimum(torch.log(-top), high), low)
    for _ in range(iterations):
        s_now = sigma.exp()
        _ratio_(torch.add(gap, s_now, out=one), two, divergence, order)
        total = one.mul_(p_ref).sum(-1, keepdim=True)
        excess = torch.log(total)  # log Σ π*: 0 at the root
        active = excess.abs() > tolerance  # rows at their root stay there
        if not bool(active.any()):
            break
        low = torch.where(excess > 0, sigma, low)
        high = torch.where(excess > 0, high, sigma)
        # Newton on log s, kept inside the bracket (bisection where it would leave it).
        derivative = -two.mul_(p_ref).sum(-1, keepdim=True) / total * s_now
        newton = sigma - excess / derivative
        inside = (newton >= low) & (newton <= high)
        sigma = torch.where(active, torch.where(inside, newton, (low + high) / 2), sigma)
    _ratio_(gap.add_(sigma.exp()), None, divergence, order)
    mixed = p_ref.mul_(gap)
    mixed = mixed.div_(mixed.sum(-1, keepdim=True)).log_().clamp_(min=LOG_FLOOR)
    vertex = used.sum(1) == 1
    if bool(vertex.any()):
        policy = weights.argmax(1)
        own = log_probs[torch.arange(len(policy)), policy].double()
        mixed = torch.where(vertex[:, None], own, mixed)
    return mixed.to(log_probs.dtype)
