"""MOD's f-divergence forms: each mixing rule against the optimum of the objective it comes from,
found numerically here, and the decoder's next-token distribution against both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from transformers import LogitsProcessor, LogitsProcessorList

from align.chat import encode_prompts
from align.decoding import guided_decode, mod_guidance
from align.decoding.divergences import mix_policies
from align.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FORMS = [("forward_kl", None), ("jensen_shannon", None), ("alpha", 0.5), ("alpha", 2.0)]
IDS = ["forward_kl", "jensen_shannon", "alpha-0.5", "alpha-2"]


# --- the oracle: f itself, a generic optimiser ------------------------------------------------


def f(x: torch.Tensor, divergence: str, order: float | None) -> torch.Tensor:
    """The textbook generator of each divergence, D_f(p‖q) = Σ q f(p / q)."""
    if divergence == "reverse_kl":
        return x * torch.log(x)
    if divergence == "forward_kl":
        return -torch.log(x)
    if divergence == "jensen_shannon":
        return x * torch.log(x) - (1 + x) * torch.log((1 + x) / 2)
    return (x ** (1 - order) - (1 - order) * x - order) / (order * (order - 1))


def f_prime(x: torch.Tensor, divergence: str, order: float | None) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x, divergence, order).sum(), x)
    return grad


def optimum(policies, weights, reference, divergence, order=None) -> np.ndarray:
    """argmax_π Σ_i α_i E_π[r_i] − D_f(π‖π_ref) over the simplex (β = 1), with r_i = f'(π_i /
    π_ref): the reward each policy π_i is the f-regularised optimum of. L-BFGS on π = softmax(θ)."""
    policies, reference = torch.as_tensor(policies), torch.as_tensor(reference)
    reward = sum(w * f_prime(p / reference, divergence, order) for w, p in zip(weights, policies))

    def objective(theta):
        theta = torch.as_tensor(theta).requires_grad_(True)
        pi = torch.softmax(theta, 0)
        loss = (reference * f(pi / reference, divergence, order)).sum() - (pi * reward).sum()
        (grad,) = torch.autograd.grad(loss, theta)
        return loss.item(), grad.numpy()

    start = torch.log(reference).numpy()
    options = {"gtol": 1e-13, "ftol": 1e-16, "maxiter": 20000}
    found = minimize(objective, start, jac=True, method="L-BFGS-B", options=options)
    return torch.softmax(torch.as_tensor(found.x), 0).numpy()


def stationarity_spread(pi, policies, weights, reference, divergence, order) -> float:
    """How far π is from the optimum of that objective, over a whole (large) vocabulary: the
    objective is convex, so π is optimal iff f'(π/π_ref) − Σ α_i f'(π_i/π_ref) takes one value
    (−Z) on every token. The largest deviation from its median, relative to the terms, on the
    tokens that carry mass (π ≥ 1e-4)."""
    pi, policies, weights, reference = (t.double() for t in (pi, policies, weights, reference))
    own = f_prime(pi / reference, divergence, order)
    mix = sum(w * f_prime(p / reference, divergence, order) for w, p in zip(weights, policies))
    keep = pi >= 1e-4
    gap = (own - mix)[keep]
    return float(((gap - gap.median()).abs() / (1 + own[keep].abs() + mix[keep].abs())).max())


def mixed(policies, weights, reference, divergence, order=None) -> np.ndarray:
    log = torch.log(torch.as_tensor(np.asarray(policies)))[None]
    out = mix_policies(
        log,
        torch.as_tensor(np.asarray(weights))[None],
        torch.log(torch.as_tensor(np.asarray(reference)))[None],
        divergence,
        order,
    )
    return out[0].exp().numpy()


def random_case(seed: int, vocab: int = 7, m: int = 3):
    rng = np.random.default_rng(seed)
    policies = rng.dirichlet(np.full(vocab, 0.6), size=m)
    return policies, rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(vocab))


@pytest.mark.parametrize(("divergence", "order"), FORMS, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_form_is_the_optimum_of_the_combined_f_regularised_objective(divergence, order, seed):
    policies, weights, reference = random_case(seed)
    expected = optimum(policies, weights, reference, divergence, order)
    got = mixed(policies, weights, reference, divergence, order)
    np.testing.assert_allclose(got, expected, atol=1e-7)
    # The rule is not the reverse-KL mixing (the forms do differ), nor a plain mixture.
    geometric = mixed(policies, weights, reference, "reverse_kl")
    assert np.abs(got - geometric).max() > 1e-3
    assert np.abs(got - weights @ policies).max() > 1e-3


def test_reverse_kl_is_the_kl_barycentre_and_the_linear_mixing_of_log_probs():
    """min_π Σ α_i KL(π‖π_i) over the simplex, and the same through the regularised objective
    (where π_ref cancels): Π π_i^{α_i}, normalised."""
    policies, weights, reference = random_case(3)

    def barycentre(theta):
        theta = torch.as_tensor(theta).requires_grad_(True)
        pi = torch.softmax(theta, 0)
        loss = sum(
            w * (pi * (pi.log() - torch.as_tensor(p).log())).sum()
            for w, p in zip(weights, policies)
        )
        (grad,) = torch.autograd.grad(loss, theta)
        return loss.item(), grad.numpy()

    found = minimize(
        barycentre,
        np.zeros(7),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 20000},
    )
    expected = torch.softmax(torch.as_tensor(found.x), 0).numpy()
    got = mixed(policies, weights, reference, "reverse_kl")
    np.testing.assert_allclose(got, expected, atol=1e-7)
    np.testing.assert_allclose(got, optimum(policies, weights, reference, "reverse_kl"), atol=1e-7)
    # Exactly the decoder's linear rule: log_softmax(Σ α_i log π_i).
    log = torch.log(torch.as_tensor(policies))
    linear = torch.log_softmax((torch.as_tensor(weights)[:, None] * log).sum(0), dim=-1)
    rule = mix_policies(log[None], torch.as_tensor(weights)[None], None, "reverse_kl")[0]
    assert torch.equal(rule, linear)


@pytest.mark.parametrize(("divergence", "order"), FORMS, ids=IDS)
def test_properties_of_every_form(divergence, order):
    rows = 4
    generator = torch.Generator().manual_seed(5)
    log = torch.log_softmax(torch.randn(rows, 3, 50, generator=generator) * 3, -1)
    reference = torch.log_softmax(torch.randn(rows, 50, generator=generator) * 3, -1)
    # A vertex α: that policy, as it is.
    vertex = torch.eye(3)[[0, 1, 2, 1]]
    out = mix_policies(log, vertex, reference, divergence, order)
    assert torch.equal(out, log[torch.arange(rows), [0, 1, 2, 1]])
    # Policies that agree: that policy, whatever α and π_ref (Z = 0).
    same = log[:, :1].expand(-1, 3, -1)
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [1 / 3] * 3, [0.0, 0.5, 0.5]])
    out = mix_policies(same, weights, reference, divergence, order)
    torch.testing.assert_close(out.exp(), same[:, 0].exp(), atol=1e-6, rtol=0)
    # Normalised, finite, and a policy with weight 0 has no say.
    out = mix_policies(log, weights, reference, divergence, order)
    sums = out.double().exp().sum(-1)
    torch.testing.assert_close(sums, torch.ones(rows, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()
    changed = log.clone()
    changed[3, 0] = torch.log_softmax(torch.randn(50, generator=generator), -1)
    assert torch.equal(mix_policies(changed, weights, reference, divergence, order)[3], out[3])


def test_alpha_divergence_orders_reach_the_kl_forms():
    policies, weights, reference = random_case(4, vocab=12)
    forward = mixed(policies, weights, reference, "forward_kl")
    np.testing.assert_allclose(
        mixed(policies, weights, reference, "alpha", 1.0), forward, atol=1e-7
    )
    reverse = mixed(policies, weights, reference, "reverse_kl")
    near_zero = mixed(policies, weights, reference, "alpha", 1e-4)
    np.testing.assert_allclose(near_zero, reverse, atol=1e-4)
    assert np.abs(mixed(policies, weights, reference, "alpha", 0.5) - reverse).max() > 1e-3


def test_extreme_distributions_stay_normalised_and_finite():
    """Near-one-hot policies, a reference that all but rules tokens out, a large vocabulary."""
    generator = torch.Generator().manual_seed(9)
    log = torch.log_softmax(torch.randn(2, 2, 4096, generator=generator) * 40, -1)
    reference = torch.log_softmax(torch.randn(2, 4096, generator=generator) * 40, -1)
    reference[0, :100] = -1e9  # the decoder's floor for "never"
    weights = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    for divergence, order in FORMS:
        out = mix_policies(log, weights, reference, divergence, order).double()
        assert torch.isfinite(out).all(), divergence
        ones = torch.ones(2, dtype=torch.float64)
        torch.testing.assert_close(out.exp().sum(-1), ones, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "bad",
    [("hellinger", None), ("alpha", None), ("alpha", 0.0), ("alpha", -1.0), ("forward_kl", 0.5)],
)
def test_bad_divergences_are_clear_errors(bad):
    with pytest.raises(ValueError, match="divergence"):
        mod_guidance(
            {"a": torch.nn.Linear(1, 1), "b": torch.nn.Linear(1, 1)},
            divergence=bad[0],
            divergence_alpha=bad[1],
        )


# --- the decoder ---------------------------------------------------------------------------


def sharp(seed):
    model = tiny_causal_lm(seed=seed, tie_word_embeddings=False)[0]
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    return model


class Record(LogitsProcessor):
    """Keeps the scores the decoder samples or argmaxes from (changes nothing)."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


@pytest.fixture(scope="module")
def decoder_setup():
    base, tokenizer = tiny_causal_lm(seed=0)
    policies = {"helpful": sharp(4), "harmless": sharp(5)}
    batch = encode_prompts(
        tokenizer, ["Hi", "Tell me about the weather on a long rainy day", "Why?"]
    )
    return base, tokenizer, policies, batch


def _next_token_log_probs(model, ids, mask, vocab):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    return torch.log_softmax(logits[:, :vocab].float(), dim=-1)


@pytest.mark.parametrize(
    ("divergence", "order"), [*FORMS, ("reverse_kl", None)], ids=[*IDS, "reverse_kl"]
)
def test_the_decoder_follows_the_rule_with_the_base_as_reference(decoder_setup, divergence, order):
    """Greedy decoding with one α per row and KV caches (the base's too): every step's
    distribution is the rule applied to the models' own next-token distributions on the whole
    sequence so far (no cache), and the first one is optimal for the objective it solves."""
    base, tokenizer, policies, batch = decoder_setup
    guidance = mod_guidance(policies, divergence=divergence, divergence_alpha=order)
    alpha = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]])
    vocab = len(tokenizer)
    record = Record()
    steps = 5
    sequences = guided_decode(
        base if guidance.needs_base else None,
        guidance,
        batch["input_ids"],
        batch["attention_mask"],
        alpha,
        max_new_tokens=steps,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=vocab,
        logits_processor=LogitsProcessorList([record]),
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1]
    for step in range(steps):
        seen = sequences[:, : width + step]
        seen_mask = torch.cat([mask, torch.ones(len(seen), step, dtype=mask.dtype)], -1)
        log = torch.stack(
            [_next_token_log_probs(m, seen, seen_mask, vocab) for m in policies.values()], 1
        )
        reference = _next_token_log_probs(base, seen, seen_mask, vocab)
        expected = mix_policies(
            log.clamp(min=-1e9), alpha, reference.clamp(min=-1e9), divergence, order
        )
        torch.testing.assert_close(record.steps[step], expected, atol=2e-5, rtol=1e-5)
        assert torch.equal(sequences[:, width + step], record.steps[step].argmax(-1))
        if step == 0:  # first-order optimality, from f itself, over the whole vocabulary
            for row in range(len(alpha)):
                pieces = (log[row].exp(), alpha[row], reference[row].exp())
                assert (
                    stationarity_spread(record.steps[0][row].exp(), *pieces, divergence, order)
                    < 1e-3
                )
                if divergence != "reverse_kl":  # a wrong rule would not pass the same check
                    geometric = mix_policies(log[row : row + 1], alpha[row : row + 1], None)[0]
                    assert stationarity_spread(geometric.exp(), *pieces, divergence, order) > 1e-2


def test_reverse_kl_decodes_exactly_as_before_and_needs_no_base(decoder_setup):
    base, tokenizer, policies, batch = decoder_setup
    alpha = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]])
    kwargs = dict(
        max_new_tokens=6,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
    )
    default = guided_decode(
        None, mod_guidance(policies), batch["input_ids"], batch["attention_mask"], alpha, **kwargs
    )
    explicit = guided_decode(
        None,
        mod_guidance(policies, divergence="reverse_kl"),
        batch["input_ids"],
        batch["attention_mask"],
        alpha,
        **kwargs,
    )
    assert torch.equal(default, explicit)
    js = mod_guidance(policies, divergence="jensen_shannon")
    with pytest.raises(ValueError, match="reference policy"):
        guided_decode(None, js, batch["input_ids"], batch["attention_mask"], alpha, **kwargs)
    assert not torch.equal(
        guided_decode(base, js, batch["input_ids"], batch["attention_mask"], alpha, **kwargs),
        default,
    )


def test_the_mod_route_takes_a_divergence_and_names_it():
    from align.sweep import build_route

    generation = {"max_new_tokens": 4}
    policies = {"helpful": "a", "harmless": "b"}
    route = build_route(
        {
            "name": "m",
            "kind": "mod",
            "policies": policies,
            "divergence": "alpha",
            "divergence_alpha": 0.5,
        },
        ["helpful", "harmless"],
        generation,
    )
    assert route.describe() == {
        "kind": "mod",
        "policies": policies,
        "divergence": "alpha",
        "divergence_alpha": 0.5,
    }
    assert route.sources() == ["a", "b"]
    plain = build_route(
        {"name": "m", "kind": "mod", "policies": policies}, ["helpful", "harmless"], generation
    )
    assert plain.describe()["divergence"] == "reverse_kl"
    with pytest.raises(ValueError, match="route 'm'.*divergence"):
        build_route(
            {"name": "m", "kind": "mod", "policies": policies, "divergence": "alpha"},
            ["helpful", "harmless"],
            generation,
        )


def test_the_mod_route_takes_arms_as_the_other_name_of_its_policies():
    """Configs written before the field was named ``policies`` call it ``arms``: the same route,
    and the same fingerprint (their cached answers stay valid)."""
    from align.sweep import build_route

    objectives, generation = ["helpful", "harmless"], {"max_new_tokens": 4}
    folders = {"helpful": "a", "harmless": "b"}
    old = build_route({"name": "m", "kind": "mod", "arms": folders}, objectives, generation)
    new = build_route({"name": "m", "kind": "mod", "policies": folders}, objectives, generation)
    assert old.policies == new.policies == folders
    assert old.describe() == new.describe()
    assert (
        old.fingerprint()
        == new.fingerprint()
        == {
            "kind": "mod",
            "arms": folders,
            "divergence": "reverse_kl",
        }
    )
    with pytest.raises(ValueError, match="route 'm'.*`policies` or `arms`.*not both"):
        build_route(
            {"name": "m", "kind": "mod", "policies": folders, "arms": folders},
            objectives,
            generation,
        )
    with pytest.raises(ValueError, match="route 'm'.*give `policies`"):
        build_route({"name": "m", "kind": "mod"}, objectives, generation)
    with pytest.raises(ValueError, match="`arms` must map each objective"):
        build_route({"name": "m", "kind": "mod", "arms": {"helpful": "a"}}, objectives, generation)
