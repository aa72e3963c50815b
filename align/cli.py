"""The ``align`` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from align import __version__
from align.demo.pipeline import DemoConfig
from align.errors import debug_requested, describe, user_error_types


class _AlignGroup(TyperGroup):
    """The one place where a bad input to any command becomes one ``error: …`` line on stderr
    and exit status 2, instead of a traceback (kept with ``--debug`` or ``ALIGN_DEBUG=1``)."""

    def invoke(self, ctx: click.Context):
        from align.distributed import PeerError, leave_process_group

        try:
            return super().invoke(ctx)
        except PeerError:
            # Several processes (accelerate launch): the one that failed shows the error.
            raise typer.Exit(1) from None
        except user_error_types() as error:
            if debug_requested(bool(ctx.params.get("debug"))):
                raise
            typer.echo(f"error: {describe(error)}", err=True)
            raise typer.Exit(2) from None
        finally:
            # A command is a process's last act: its process group (a sharded sweep or
            # generate) goes down here rather than at interpreter exit.
            leave_process_group()


app = typer.Typer(
    cls=_AlignGroup,
    help="align: multi-objective alignment of language models along a preference vector α.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"align {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Show the full traceback of an error (also: ALIGN_DEBUG=1).",
        ),
    ] = False,
) -> None:
    """align: multi-objective alignment of language models along a preference vector α."""


def _objective_scorers(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    pairs = {}
    for item in items:
        name, sep, scorer = item.partition("=")
        if not sep or not name.strip() or not scorer.strip():
            raise typer.BadParameter(
                f"{item!r} must look like NAME=SCORER", param_hint="--objective"
            )
        pairs[name.strip()] = scorer.strip()
    return pairs


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def scorers() -> None:
    """List the registered scorers."""
    from align.scorers import available_scorers

    table = Table("scorer", "what it measures (higher is better)")
    for name, description in available_scorers().items():
        table.add_row(name, description)
    console.print(table)


@app.command()
def demo(
    output: Annotated[
        Path, typer.Option(help="Folder for every stage and the report (git ignores runs/).")
    ] = Path(DemoConfig.output),
    model: Annotated[
        str, typer.Option(help="Embedded model name, local checkpoint folder or hub id.")
    ] = "smollm2-135m-instruct",
    parm_steps: Annotated[
        int, typer.Option(min=1, help="PARM training steps.")
    ] = DemoConfig.parm_steps,
    arm_steps: Annotated[
        int, typer.Option(min=1, help="Training steps per GenARM ARM.")
    ] = DemoConfig.arm_steps,
    with_dpo: Annotated[
        bool, typer.Option("--with-dpo", help="Also train and sweep an SVD-LoRA DPO policy.")
    ] = False,
    dpo_steps: Annotated[int, typer.Option(min=1, help="DPO policy training steps.")] = 30,
    with_rl: Annotated[
        bool,
        typer.Option(
            "--with-rl",
            help="Also train (GRPO against the objectives' scorers) and sweep one α-conditioned "
            "PBLoRA policy: about 30 minutes more on 2 CPU cores.",
        ),
    ] = False,
    rl_steps: Annotated[
        int, typer.Option(min=1, help="GRPO steps of the --with-rl policy (8 completions each).")
    ] = DemoConfig.rl_steps,
    soup: Annotated[
        bool, typer.Option("--soup/--no-soup", help="Sweep rewarded soups of the two ARMs.")
    ] = True,
    eval_prompts: Annotated[
        int, typer.Option(min=1, max=30, help="Held-out prompts answered (30: all of them).")
    ] = DemoConfig.eval_prompts,
    grid: Annotated[
        int, typer.Option(min=1, help="Simplex divisions (10: 11 α points).")
    ] = DemoConfig.grid,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 48,
    beta: Annotated[
        float, typer.Option(help="Guidance β (reward weighted 1/β).")
    ] = DemoConfig.beta,
    data: Annotated[
        Path | None, typer.Option(help="A preference dataset instead of the shipped one.")
    ] = None,
    objective: Annotated[
        list[str] | None,
        typer.Option(
            "--objective",
            help="NAME=SCORER: an objective of the dataset and the scorer that measures it "
            "(repeatable; default: the shipped dataset's positive=positivity, brief=brevity).",
        ),
    ] = None,
    recipes: Annotated[
        Path | None, typer.Option(help="Recipe folder (default: the recipes align ships).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field of every training recipe (repeatable)."),
    ] = None,
) -> None:
    """Multi-objective alignment end to end: train a PARM and GenARM ARMs on the shipped
    positive/brief dataset (or any dataset with --objective NAME=SCORER), merge rewarded soups,
    sweep 11 α through every route, and write a report (Pareto fronts, hypervolume, MIP). Stages
    are cached: a re-run reuses them."""
    from rich.markdown import Markdown

    from align.demo import DemoConfig, run_demo

    started = time.perf_counter()
    config = DemoConfig(
        model=model,
        output=str(output),
        data=None if data is None else str(data),
        objectives=_objective_scorers(objective),
        recipes=None if recipes is None else str(recipes),
        parm_steps=parm_steps,
        arm_steps=arm_steps,
        dpo_steps=dpo_steps,
        with_dpo=with_dpo,
        rl_steps=rl_steps,
        with_rl=with_rl,
        soup=soup,
        eval_prompts=eval_prompts,
        grid=grid,
        max_new_tokens=max_new_tokens,
        beta=beta,
        overrides=tuple(overrides or ()),
    )
    console.print(f"align demo: writing to {output.resolve()}")
    run_demo(config, log=console.print)
    summary = output / "report" / "summary.md"
    console.print(Markdown(summary.read_text()))
    console.print(f"report: {(output / 'report').resolve()} (summary.md, front.png, report.json)")
    console.print(f"align demo done in {time.perf_counter() - started:.0f} s")


@app.command()
def evaluate(
    config: Annotated[Path, typer.Argument(help="An evaluation config YAML (recipes/evaluate/).")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field: output=reports/x (repeatable)."),
    ] = None,
) -> None:
    """Sweep α through any routes (PARM, GenARM, MOD, a preference-adapter policy, merged
    checkpoints, the base) with any registered scorers; write Pareto fronts, hypervolume, MIP."""
    from rich.markdown import Markdown

    from align.distributed import current_shard
    from align.sweep import load_sweep_config, run_sweep

    sweep = load_sweep_config(config, overrides or [])
    run_sweep(sweep)
    if current_shard().is_main:
        console.print(Markdown((Path(sweep.output) / "summary.md").read_text()))
        console.print(f"report: {sweep.output}")


@app.command()
def sample(
    model: Annotated[
        str, typer.Option(help="Embedded model name, local checkpoint folder or hub id.")
    ] = "smollm2-135m-instruct",
    num_prompts: Annotated[
        int, typer.Option("--num-prompts", "-n", min=1, help="Shipped prompts to answer.")
    ] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per answer.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 8,
    scorer_names: Annotated[
        str, typer.Option("--scorers", help="Comma-separated scorer names.")
    ] = "positivity,brevity",
    output: Annotated[Path | None, typer.Option(help="Also write the rows as JSONL here.")] = None,
) -> None:
    """Answer shipped prompts with a model, score every answer on each objective, and show
    which answers are Pareto-optimal."""
    import numpy as np

    from align.data import load_prompts
    from align.decoding import generate_responses
    from align.io import atomic_file
    from align.metrics import pareto_mask
    from align.models import load_model
    from align.scorers import get_scorer

    names = _split(scorer_names)
    if not names:
        raise typer.BadParameter("name at least one scorer", param_hint="--scorers")
    started = time.perf_counter()
    with console.status(f"loading {model} ..."):
        lm, tokenizer = load_model(model)
    # Brevity counts the model's own tokens against the generation budget.
    options = {"brevity": {"tokenizer": tokenizer, "max_tokens": max_new_tokens}}
    try:
        scorer_objects = [get_scorer(name, **options.get(name, {})) for name in names]
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--scorers") from error
    prompts = [record["prompt"] for record in load_prompts(limit=num_prompts)]
    responses = generate_responses(
        lm, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    scores = np.stack([scorer.score(prompts, responses) for scorer in scorer_objects], axis=1)
    on_front = pareto_mask(scores)

    table = Table(
        title=f"{model}: {len(prompts)} answers scored on {', '.join(names)}", show_lines=True
    )
    table.add_column("prompt", max_width=36)
    table.add_column("response", max_width=60)
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("Pareto", justify="center")
    for prompt, response, row, front in zip(prompts, responses, scores, on_front):
        table.add_row(prompt, response, *(f"{value:.3f}" for value in row), "★" if front else "")
    console.print(table)
    means = ", ".join(f"{name} {value:.3f}" for name, value in zip(names, scores.mean(axis=0)))
    console.print(
        f"mean: {means}; {int(on_front.sum())} of {len(prompts)} answers are Pareto-optimal"
    )
    console.print(f"done in {time.perf_counter() - started:.1f} s")

    if output is not None:
        with atomic_file(output) as tmp, tmp.open("w", encoding="utf-8") as handle:
            for prompt, response, row in zip(prompts, responses, scores):
                record = {
                    "prompt": prompt,
                    "response": response,
                    "scores": dict(zip(names, row.tolist())),
                }
                handle.write(json.dumps(record) + "\n")
        console.print(f"wrote {output}")


def _read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    from align.data.prompts import read_prompt_file

    texts = list(prompts)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise typer.BadParameter(f"no such file: {prompts_file}", param_hint="--prompts-file")
        texts += read_prompt_file(prompts_file)  # a bad file: one error naming it and the line
    if not texts:
        raise typer.BadParameter(
            "give at least one --prompt or a --prompts-file", param_hint="--prompt"
        )
    return texts


@app.command()
def generate(
    arm: Annotated[
        list[str],
        typer.Option(
            help=(
                "PARM: one adapter folder. GenARM: NAME=PATH of an ARM per objective; MOD: "
                "NAME=PATH of a policy per objective (in α order)."
            )
        ),
    ],
    preference: Annotated[str, typer.Option(help="α, e.g. helpful=0.7,harmless=0.3 (or 0.7,0.3).")],
    base: Annotated[
        str, typer.Option(help="The frozen base model (name, folder or hub id).")
    ] = "smollm2-135m-instruct",
    mode: Annotated[str, typer.Option(help="parm, genarm or mod.")] = "parm",
    divergence: Annotated[
        str,
        typer.Option(
            help="MOD: reverse_kl (log-probs mixed), forward_kl, jensen_shannon or alpha "
            "(these three with --base as the reference policy)."
        ),
    ] = "reverse_kl",
    divergence_alpha: Annotated[
        float | None, typer.Option(help="MOD --divergence alpha: its order (> 0).")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="Prompts: .txt (one per line) or .jsonl ('prompt').")
    ] = None,
    beta: Annotated[
        float, typer.Option(help="β: the reward term is weighted 1/β (larger β, weaker guidance).")
    ] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts decoded together.")] = 8,
    sample: Annotated[
        bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")
    ] = False,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    output: Annotated[
        Path | None, typer.Option(help="Write JSONL rows here instead of printing.")
    ] = None,
) -> None:
    """Guided decoding: a frozen base steered token by token by PARM / GenARM rewards, or MOD.

    Under ``accelerate launch`` (``-m align generate ...``) the batches of prompts are shared by
    the processes and rank 0 writes every answer, the same as one process writes."""
    from tqdm.auto import tqdm

    from align.decoding import genarm_guidance, guided_generate, mod_guidance, parm_guidance
    from align.decoding.divergences import check_divergence
    from align.decoding.loading import load_guide
    from align.distributed import current_shard
    from align.io import atomic_file
    from align.models import load_model
    from align.preference import Preference

    if mode not in ("parm", "genarm", "mod"):
        raise typer.BadParameter(
            f"unknown mode {mode!r}; use parm, genarm or mod", param_hint="--mode"
        )
    if divergence != "reverse_kl" and mode != "mod":
        raise typer.BadParameter(
            f"--divergence {divergence} is a form of MOD; give --mode mod",
            param_hint="--divergence",
        )
    try:
        check_divergence(divergence, divergence_alpha)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--divergence") from error
    texts = _read_prompts(prompt or [], prompts_file)
    shard = current_shard()
    # MOD's reverse KL needs no base; its other forms use it as the reference policy.
    reference_free = mode == "mod" and divergence == "reverse_kl"
    base_model, tokenizer = (None, None) if reference_free else load_model(base)
    if mode == "parm":
        if len(arm) != 1 or "=" in arm[0]:
            raise typer.BadParameter("PARM takes one --arm: the adapter folder", param_hint="--arm")
        # An adapter trained on --base is attached to the loaded base (PEFT injects in place), so
        # decoding runs base and PARM rows as one batched forward.
        model, arm_tokenizer = load_guide(arm[0], base, base_model=base_model)
        guidance = parm_guidance(model, beta, tokenizer=arm_tokenizer)
    else:
        pairs = [item.split("=", 1) for item in arm]
        if any(len(pair) != 2 for pair in pairs):
            raise typer.BadParameter(
                f"{mode} takes --arm NAME=PATH per objective"
                + (" (the objective's policy)" if mode == "mod" else " (the objective's ARM)"),
                param_hint="--arm",
            )
        loaded = {name: load_guide(path, base) for name, path in pairs}
        models = {name: model for name, (model, _) in loaded.items()}
        tokenizers = [tok for _, tok in loaded.values()]
        if mode == "genarm":
            guidance = genarm_guidance(models, beta, tokenizers)
        else:
            guidance = mod_guidance(models, tokenizers, divergence, divergence_alpha)
            tokenizer = tokenizer if tokenizer is not None else tokenizers[0]
    try:
        alpha = Preference.parse(preference, guidance.objectives)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--preference") from error

    # The batches are the same whatever the number of processes; each takes a contiguous run.
    starts = list(range(0, len(texts), batch_size))
    mine = shard.mine([len(texts[s : s + batch_size]) for s in starts])
    shard.log_share("generate", len(mine), len(starts), "batches")
    decoded: list[tuple[int, list[str]]] = []
    error = None
    try:
        for index in tqdm(mine, desc="guided decoding", unit="batch", disable=not shard.is_main):
            start = starts[index]
            batch = guided_generate(
                base_model,
                tokenizer,
                texts[start : start + batch_size],
                guidance,
                alpha,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=None if seed is None else seed + start,
            )
            decoded.append((index, batch))
    except Exception as caught:
        error = caught
    shard.check(error)
    gathered = shard.gather(decoded)
    if not shard.is_main:
        return
    by_batch = dict(pair for part in gathered for pair in part)
    responses = [text for index in range(len(starts)) for text in by_batch[index]]
    extra = {"divergence": divergence} if mode == "mod" else {}
    if divergence_alpha is not None:
        extra["divergence_alpha"] = divergence_alpha
    rows = [
        {"prompt": p, "response": r, "preference": alpha.to_dict(), "mode": mode, **extra}
        for p, r in zip(texts, responses)
    ]
    if output is None:
        for row in rows:
            console.print(f"[bold]{row['prompt']}[/bold]\n{row['response']}\n")
        return
    with atomic_file(output) as tmp, tmp.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    console.print(f"wrote {len(rows)} rows to {output}")


def _route_spec(text: str) -> dict:
    """A route spec: inline YAML (``{kind: parm, adapter: ..., beta: 1}``) or a YAML file."""
    import yaml

    from align.errors import yaml_problem
    from align.files import read_text

    path = Path(text).expanduser()
    is_file = path.suffix in (".yaml", ".yml", ".json") or path.is_file()
    if is_file and not path.is_file():
        raise FileNotFoundError(f"no such route file: {path}")
    try:
        spec = yaml.safe_load(read_text(path) if is_file else text)
    except yaml.YAMLError as error:  # name the file (or the option) the YAML came from
        where = path if is_file else "--route"
        raise ValueError(f"{where}: not valid YAML: {yaml_problem(error)}") from error
    if not isinstance(spec, dict):
        raise ValueError(
            f"--route must be a mapping such as '{{kind: parm, adapter: FOLDER, beta: 1}}' "
            f"(or a YAML file holding one), got {spec!r}"
        )
    return spec


@app.command()
def serve(
    route: Annotated[
        str,
        typer.Option(
            help="What to serve, as a route of an evaluate config: inline YAML such as "
            "'{kind: parm, adapter: runs/demo/parm, beta: 1}' (kinds: parm, genarm, mod, policy) "
            "or a YAML file holding it."
        ),
    ],
    base: Annotated[
        str, typer.Option(help="The frozen base model (name, folder or hub id).")
    ] = "smollm2-135m-instruct",
    objectives: Annotated[
        str | None,
        typer.Option(help="Objective names, comma-separated (default: those of the route)."),
    ] = None,
    preference: Annotated[
        str | None,
        typer.Option(help="α of requests that give none, e.g. helpful=0.7,harmless=0.3."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Requests decoded together at most (continuous batching).")
    ] = 16,
    name: Annotated[
        str | None, typer.Option(help="The model id clients ask for (default: align-KIND).")
    ] = None,
    max_context: Annotated[
        int | None, typer.Option(min=2, help="Prompt + new tokens at most (default: the model's).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="New tokens of a request that sets no max_tokens.")
    ] = 256,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: auto).")] = None,
    dtype: Annotated[str, typer.Option(help="Weights dtype.")] = "float32",
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads of the model (default: torch's, one per core)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="ALIGN_API_KEY",
            show_envvar=True,
            help="Requests to /v1 need `Authorization: Bearer KEY` (else 401). The variable "
            "keeps the key out of the process list.",
        ),
    ] = None,
    max_queue: Annotated[
        int,
        typer.Option(min=0, help="Requests waiting for a row at most; past it a 429."),
    ] = 64,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body accepted (else 413).")
    ] = 1 << 20,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Seconds a request may take, waiting included (else 504). Default: none.",
        ),
    ] = None,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="On SIGTERM or Ctrl-C, seconds in-flight requests get to finish before they "
            "are cancelled (new ones get 503); then the process exits 0.",
        ),
    ] = 10.0,
) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models,
    /health): a frozen base guided by a PARM, GenARM ARMs or MOD policies, or a
    preference-adapter policy; each request brings its own α (`preference` in the body) and
    concurrent requests decode together."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        typer.echo(
            f"error: align serve needs the serve extra (pip install 'align[serve]'): {error}",
            err=True,
        )
        raise typer.Exit(2) from None
    from align.serve import ServedModel
    from align.serve import serve as run_server

    spec = _route_spec(route)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    with console.status(f"loading {base} and the {spec.get('kind')} route ..."):
        served = ServedModel(
            spec,
            base=base,
            objectives=_split(objectives) if objectives else None,
            preference=preference,
            name=name,
            device=device,
            dtype=dtype,
            max_context=max_context,
            default_max_tokens=max_tokens,
        )
    console.print(
        f"serving {served.name} ({served.route.kind} on {base}; objectives "
        f"{', '.join(served.objectives)}; default α {served.default_preference}) at "
        f"http://{host}:{port}/v1, up to {max_batch} requests decoded together"
    )
    try:
        run_server(
            served,
            host=host,
            port=port,
            max_batch=max_batch,
            api_key=api_key or None,
            max_queue=max_queue,
            max_body_bytes=max_body_bytes,
            request_timeout=request_timeout,
            shutdown_timeout=shutdown_timeout,
            log_level="warning",
        )
    finally:
        served.close()


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/).")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe field: args.max_steps=10 (repeatable)."),
    ] = None,
) -> None:
    """Train as a recipe says (ARM, PARM or preference DPO), resuming from its last checkpoint.

    Across processes: accelerate launch --config_file accelerate_configs/X.yaml -m align.train
    RECIPE.yaml
    """
    from align.train import load_recipe, run_recipe

    final = run_recipe(load_recipe(recipe, overrides or []))
    console.print(f"adapter saved to {final}")


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="A merge config YAML (see recipes/merging/).")],
    out: Annotated[Path, typer.Argument(help="Output folder, written atomically.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it exists.")
    ] = False,
) -> None:
    """Merge checkpoints along α: one preference or a sweep (linear, task arithmetic, TIES,
    DARE, DELLA, breadcrumbs, SLERP, model stock, ...), LoRA adapters exactly, or train /
    materialise a Pareto-merging artifact. An interrupted sweep resumes when run again."""
    from rich.markup import escape

    from align.merging import run_merge_config
    from align.merging.config import load_merge_config

    started = time.perf_counter()
    # MergeConfigError, MergeInputError and CheckpointError are ValueErrors: every mismatch is
    # listed in the one error message.
    folders = run_merge_config(load_merge_config(config), out, overwrite=overwrite)
    for folder in folders:
        console.print(f"wrote {escape(str(folder))}")
    console.print(f"{len(folders)} folder(s) in {time.perf_counter() - started:.1f} s")


@app.command("convert-parm")
def convert_parm(
    src: Annotated[Path, typer.Argument(help="A PBLoRA adapter folder of PARM's own code.")],
    dst: Annotated[Path, typer.Argument(help="The folder to write (new or empty).")],
    objective: Annotated[
        list[str] | None,
        typer.Option(help="Objective name, one per preference dimension in pref_vec's order."),
    ] = None,
    to_reference: Annotated[
        bool,
        typer.Option("--to-reference", help="The other way: an align PBLoRA folder to PARM's."),
    ] = False,
) -> None:
    """Convert a PBLoRA adapter between the layout of PARM's reference code and align's."""
    from align.adapters.pblora.reference import convert_reference_parm, save_reference_parm

    if to_reference:
        written = save_reference_parm(src, dst)
    else:
        written = convert_reference_parm(src, dst, objective or [])
    console.print(f"wrote {written}")


if __name__ == "__main__":
    app()
