"""Multi-objective training problems for meta-training and evaluating ML2O.

Every problem is a function of one flat parameter vector ``x (dim,)`` returning the m
objectives ``f(x) (m,)`` (all minimised, all ≥ 0), differentiable in x so that the meta-trainer
can back-propagate through the trajectory. Four families:

* :class:`BoxProblem` — a benchmark of :mod:`lab.synthetic` (ZDT1/2, VLMOP2, DTLZ2) with
  projection onto its box; deterministic.
* :class:`Quadratic` — ``f_i = ½ mean((A_i (x − a_i))²)``, random ill-conditioned A_i, distinct
  minimisers a_i (so the objectives conflict), optional gradient noise (a random linear term
  ``⟨ξ_i, x⟩`` per call, ``E ξ = 0``).
* :class:`MultiTaskMLP` — a small multi-task network (shared trunk, one head per task) on
  generated data: a random teacher makes regression and classification targets from Gaussian
  (or mixture-of-Gaussians) inputs; each call draws a mini-batch (with replacement; the whole
  data set once ``batch`` reaches its size).
* :class:`TinyLMAdapter` — a low-rank adapter on the q/v (or other) projections of a frozen tiny
  random Llama (:func:`align.testing.tiny_causal_lm`); objective i is the language-model loss
  on prompts of one category of ``align/resources/prompts.jsonl``; mini-batches.

``meta_distribution`` draws the meta-training problems; ``heldout_problems`` builds the
evaluation set: other sizes, architectures, data and numbers of objectives than meta-training.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from lab.synthetic.problems import get_problem


class Problem:
    """``losses(x)`` → (m,); ``full=True`` gives the deterministic (full-data) objectives."""

    name: str = "problem"
    num_objectives: int
    dim: int
    #: The SGD step size for this problem (shared by every method that runs on it).
    lr: float

    def initial(self, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def losses(
        self, x: Tensor, generator: torch.Generator | None = None, full: bool = False
    ) -> Tensor:
        raise NotImplementedError

    def project(self, x: Tensor) -> Tensor:
        return x

    def __repr__(self) -> str:
        return f"{self.name}(dim={self.dim}, m={self.num_objectives})"


class BoxProblem(Problem):
    """A :mod:`lab.synthetic` benchmark, float32, projected onto its box."""

    def __init__(self, name: str, lr: float = 0.05, **options) -> None:
        self.problem = get_problem(name, **options)
        self.name = f"{name}(n={self.problem.num_variables})"
        self.num_objectives = self.problem.num_objectives
        self.dim = self.problem.num_variables
        self.lr = lr
        self.lower, self.upper = (b.float() for b in self.problem.bounds)

    def initial(self, generator: torch.Generator) -> Tensor:
        return self.lower + (self.upper - self.lower) * torch.rand(self.dim, generator=generator)

    def losses(self, x, generator=None, full=False):
        return self.problem(x.unsqueeze(0))[0]

    def project(self, x: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(x, self.upper), self.lower)


class Quadratic(Problem):
    """``f_i(x) = ½ mean_k ((A_i (x − a_i))_k²)`` (+ ``⟨ξ_i, x⟩`` noise when not ``full``)."""

    def __init__(
        self, dim: int, m: int, seed: int, condition: float = 30.0, noise: float = 0.0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.name = f"quadratic(n={dim},m={m})"
        self.num_objectives, self.dim, self.noise = m, dim, noise
        mats = []
        for _ in range(m):
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
            spectrum = torch.logspace(0, -math.log10(condition) / 2, dim)  # singular values
            mats.append(spectrum.unsqueeze(1) * q.T)  # A = diag(σ) Qᵀ: rotated, not separable
        self.matrices = torch.stack(mats)  # (m, n, n)
        self.centres = torch.randn(m, dim, generator=g)
        if noise:
            # The noisy gradient is read as the mean of ``batch`` independent draws (noise
            # std / √batch), so a growing "batch" (DSSMG's growing sample) shrinks it.
            self.batch, self.data_size = 1, 4096
        self.lr = 0.9 * dim  # the Hessian is AᵀA / n = Q diag(σ²) Qᵀ / n, largest eigenvalue 1/n

    def initial(self, generator):
        return torch.randn(self.dim, generator=generator) * 2.0

    def losses(self, x, generator=None, full=False):
        diff = x.unsqueeze(0) - self.centres  # (m, n)
        residual = torch.einsum("mij,mj->mi", self.matrices, diff)
        values = 0.5 * residual.square().mean(1)
        if self.noise and not full:
            xi = torch.randn(self.num_objectives, self.dim, generator=generator)
            scale = self.noise / self.dim / math.sqrt(getattr(self, "batch", 1))
            # Linear noise keeps E f the same up to a constant; it only perturbs the gradients.
            values = values + scale * (xi * (x - x.detach())).sum(1)  # 0, gradient scale·ξ
        return values


class _Flat:
    """Slices of a flat vector viewed as tensors of given shapes."""

    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.dim = sum(self.sizes)

    def split(self, x: Tensor) -> list[Tensor]:
        return [p.view(s) for p, s in zip(x.split(self.sizes), self.shapes)]


class MultiTaskMLP(Problem):
    """A shared MLP trunk with one head per task, on data from a random teacher.

    ``tasks``: a string of ``r`` (regression, MSE on a standardised target) and ``c``
    (3-class classification, cross-entropy), one letter per objective. ``data``: ``"gauss"``
    (standard normal inputs) or ``"mixture"`` (a mixture of 4 shifted, scaled Gaussians).
    """

    def __init__(
        self,
        seed: int,
        tasks: str = "rc",
        in_dim: int = 8,
        hidden: tuple[int, ...] = (16,),
        activation: str = "tanh",
        data: str = "gauss",
        samples: int = 512,
        batch: int = 32,
        lr: float = 0.3,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.name = f"mtl({'-'.join(map(str, hidden))},{activation},{data},{tasks})"
        self.num_objectives, self.tasks, self.batch, self.lr = len(tasks), tasks, batch, lr
        self.act = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}[activation]
        if data == "gauss":
            inputs = torch.randn(samples, in_dim, generator=g)
        else:
            means = 2.0 * torch.randn(4, in_dim, generator=g)
            which = torch.randint(0, 4, (samples,), generator=g)
            inputs = means[which] + 0.5 * torch.randn(samples, in_dim, generator=g)
            inputs = (inputs - inputs.mean(0)) / inputs.std(0)
        teacher = torch.randn(in_dim, 8, generator=g) / math.sqrt(in_dim)
        shared = torch.tanh(inputs @ teacher * 2.0)
        self.inputs, self.targets = inputs, []
        for kind in tasks:
            if kind == "r":
                y = shared @ torch.randn(8, generator=g) + 0.3 * torch.randn(samples, generator=g)
                self.targets.append((y - y.mean()) / y.std())
            else:
                self.targets.append((shared @ torch.randn(8, 3, generator=g)).argmax(1))
        widths = [in_dim, *hidden]
        shapes = []
        for a, b in zip(widths[:-1], widths[1:]):
            shapes += [(b, a), (b,)]
        for kind in tasks:
            out = 1 if kind == "r" else 3
            shapes += [(out, widths[-1]), (out,)]
        self.flat = _Flat(shapes)
        self.dim = self.flat.dim
        self.depth = len(hidden)
        self.data_size = samples

    def initial(self, generator):
        pieces = []
        for shape in self.flat.shapes:
            if len(shape) == 2:
                pieces.append(
                    torch.randn(shape, generator=generator).flatten() / math.sqrt(shape[1])
                )
            else:
                pieces.append(torch.zeros(shape).flatten())
        return torch.cat(pieces)

    def losses(self, x, generator=None, full=False):
        if full or self.batch >= len(self.inputs):
            rows = slice(None)
        else:
            rows = torch.randint(0, len(self.inputs), (self.batch,), generator=generator)
        params = self.flat.split(x)
        h = self.inputs[rows]
        for layer in range(self.depth):
            h = self.act(F.linear(h, params[2 * layer], params[2 * layer + 1]))
        values = []
        for i, kind in enumerate(self.tasks):
            w, b = params[2 * self.depth + 2 * i], params[2 * self.depth + 2 * i + 1]
            out, target = F.linear(h, w, b), self.targets[i][rows]
            if kind == "r":
                values.append(F.mse_loss(out.squeeze(1), target))
            else:
                values.append(F.cross_entropy(out, target))
        return torch.stack(values)


@cache
def _category_texts() -> dict[str, list[str]]:
    text = resources.files("align").joinpath("resources/prompts.jsonl").read_text()
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["category"], []).append(row["prompt"])
    return out


@cache
def _tiny_lm(seed: int, layers: int, hidden: int):
    from align.testing import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model, _ = tiny_causal_lm(
        tokenizer,
        seed=seed,
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
    )
    model.requires_grad_(False)
    return model, tokenizer


class TinyLMAdapter(Problem):
    """A LoRA-style adapter ``W + B A / r`` on ``targets`` of a frozen tiny random Llama;
    objective i = the LM loss on prompts of ``categories[i]`` (mini-batches of ``batch``)."""

    def __init__(
        self,
        seed: int,
        categories: tuple[str, ...] = ("advice", "opinion"),
        targets: tuple[str, ...] = ("q_proj", "v_proj"),
        rank: int = 2,
        layers: int = 2,
        hidden: int = 64,
        batch: int = 8,
        max_tokens: int = 24,
        lr: float = 5.0,
    ) -> None:
        self.model, tokenizer = _tiny_lm(seed, layers, hidden)
        self.name = f"tinylm(L{layers},h{hidden},r{rank},{'+'.join(targets)})"
        self.num_objectives, self.batch, self.rank, self.lr = len(categories), batch, rank, lr
        texts = _category_texts()
        self.data = []
        for category in categories:
            enc = tokenizer(
                texts[category],
                padding="max_length",
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            self.data.append((enc["input_ids"], enc["attention_mask"], labels))
        self.data_size = min(len(ids) for ids, _, _ in self.data)
        named = dict(self.model.named_parameters())
        self.names = [n for n in named if n.endswith(".weight") and n.split(".")[-2] in targets]
        shapes = []
        for n in self.names:
            out_dim, in_dim = named[n].shape
            shapes += [(rank, in_dim), (out_dim, rank)]
        self.base = {n: named[n] for n in self.names}
        self.flat = _Flat(shapes)
        self.dim = self.flat.dim

    def initial(self, generator):
        pieces = []
        for k, shape in enumerate(self.flat.shapes):
            if k % 2 == 0:  # A: random; B: zero (a LoRA starts at the base model)
                pieces.append(
                    torch.randn(shape, generator=generator).flatten() / math.sqrt(shape[1])
                )
            else:
                pieces.append(torch.zeros(shape).flatten())
        return torch.cat(pieces)

    def losses(self, x, generator=None, full=False):
        params = self.flat.split(x)
        overrides = {
            n: self.base[n] + params[2 * k + 1] @ params[2 * k] / self.rank
            for k, n in enumerate(self.names)
        }
        values = []
        for ids, mask, labels in self.data:
            if not full and self.batch < len(ids):
                rows = torch.randint(0, len(ids), (self.batch,), generator=generator)
                ids, mask, labels = ids[rows], mask[rows], labels[rows]
            out = torch.func.functional_call(
                self.model,
                overrides,
                (),
                {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False},
                strict=False,
            )
            values.append(out.loss)
        return torch.stack(values)


# --------------------------------------------------------------------------------- sets
FAMILIES = ("synthetic", "quadratic", "multitask", "tiny_lm")
_TRAIN_CATEGORIES = ("advice", "explanation", "opinion", "review", "creative", "description")
_HELDOUT_CATEGORIES = ("comparison", "feedback", "everyday", "frustration")


def sample_problem(family: str, rng: np.random.Generator) -> Problem:
    """One meta-training problem of ``family``, its size and data drawn from ``rng``."""
    seed = int(rng.integers(0, 2**31 - 1))
    if family == "synthetic":
        if rng.random() < 0.5:
            return BoxProblem("zdt1", num_variables=int(rng.integers(5, 31)), lr=0.05)
        # VLMOP2 beyond a few variables starts on its flat plateau (gradients ~ e^{-n}).
        return BoxProblem("vlmop2", num_variables=int(rng.integers(2, 5)), lr=0.3)
    if family == "quadratic":
        return Quadratic(
            int(rng.integers(10, 81)), int(rng.integers(2, 4)), seed, noise=float(rng.random())
        )
    if family == "multitask":
        tasks = ("rc", "cr", "rr", "cc")[int(rng.integers(0, 4))]
        return MultiTaskMLP(seed, tasks, hidden=(int(rng.integers(8, 33)),), activation="tanh")
    if family == "tiny_lm":
        pair = rng.choice(len(_TRAIN_CATEGORIES), 2, replace=False)
        return TinyLMAdapter(
            int(rng.integers(0, 3)), tuple(_TRAIN_CATEGORIES[i] for i in pair), rank=2
        )
    raise ValueError(f"unknown problem family {family!r}; available: {', '.join(FAMILIES)}")


def heldout_problems(seed: int = 1234) -> list[Problem]:
    """Evaluation problems unlike the meta-training ones: another benchmark (ZDT2) and three
    objectives (DTLZ2), a larger quadratic with m = 4, a deeper, wider GELU multi-task network
    with three tasks on mixture data, and a rank-4 adapter on other projections of a bigger
    tiny model, on prompt categories never seen in meta-training."""
    return [
        BoxProblem("zdt2", num_variables=20, lr=0.05),
        BoxProblem("dtlz2", num_objectives=3, lr=0.1),
        Quadratic(200, 4, seed, noise=0.5),
        MultiTaskMLP(
            seed, "rcc", in_dim=12, hidden=(48, 24), activation="gelu", data="mixture", lr=0.3
        ),
        TinyLMAdapter(
            7,
            ("comparison", "frustration"),
            targets=("o_proj", "up_proj"),
            rank=4,
            layers=3,
            hidden=96,
            lr=5.0,
        ),
    ]
