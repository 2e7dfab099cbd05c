"""The `tunesmith` command: parse, load the config, call a recipe or a command. Nothing else lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith import commands
from tunesmith.errors import TrainingHalted, UserError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Fine-tune pretrained language models from one YAML file, and prove the fine-tune helped.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect data without training.")
app.add_typer(data_app, name="data")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration schema or a resolved config.")
app.add_typer(config_app, name="config")

Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.lr=1e-4 peft.r=8")]
NumCandidates = Annotated[
    Optional[int],
    typer.Option(
        help="Candidates per prompt, one kept (overrides the run's eval.decoding.num_candidates; 1: one output)."
    ),
]
DecodingOverrides = Annotated[
    Optional[list[str]],
    typer.Option(
        "--decoding", help="KEY=VALUE override of the run's eval.decoding (repeatable), e.g. --decoding do_sample=true"
    ),
]


def _console():
    from tunesmith.console import console

    return console


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run of this name from its newest checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run directory of this name.")
    ] = False,
    allow_drift: Annotated[
        bool, typer.Option("--allow-drift", help="Resume even if the config or data changed (recorded).")
    ] = False,
    fallback: Annotated[
        bool, typer.Option("--fallback", help="If the newest checkpoint fails verification, use an older one.")
    ] = False,
) -> None:
    """Fine-tune: data -> split -> load weights -> train -> evaluate before/after.

    Example: tunesmith train examples/alpaca-smollm2.yaml train.lr=1e-4 peft.r=8
    """
    commands.train(config, overrides, resume, overwrite, allow_drift, fallback)


@app.command("eval")
def eval_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory (runs/<name>).")],
    split: Annotated[str, typer.Option(help="validation or test.")] = "validation",
    data: Annotated[Optional[str], typer.Option(help="Score this data file instead (same format as training).")] = None,
    num_candidates: NumCandidates = None,
    decoding: DecodingOverrides = None,
) -> None:
    """Score the base and the fine-tuned model on a split (or a file) with the task's metrics, generating
    with the run's eval.decoding (or its overrides here; eval.json records which).

    Example: tunesmith eval runs/commongen --split test
    """
    from tunesmith.recipes.loop import evaluate_run

    if split not in ("validation", "test"):
        raise UserError(f"--split must be validation or test, not {split!r}")
    evaluate_run(str(run), split, data, num_candidates, decoding)


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="YAML config with a search: block.")],
    overrides: Overrides = None,
    trials: Annotated[
        Optional[int],
        typer.Option(
            help="Trials the study should have in all (a re-run continues it). Default: 12 without --budget, "
            "no limit with it."
        ),
    ] = None,
    budget: Annotated[
        Optional[str],
        typer.Option(
            help="Wall-clock time for the whole study, e.g. 90s, 45m, 1.5h, 2h30m (a re-run counts the time already "
            "spent). No trial starts that cannot finish in the time left; a trial training at the deadline is "
            "stopped (SIGTERM, checkpoint) and recorded pruned. A budget shorter than one trial (estimated by a "
            "3-step timed probe, or the study's shortest complete trial) is refused before any trial."
        ),
    ] = None,
) -> None:
    """Hyperparameter search (Optuna, TPE + median pruning) over the config's search.space, up to --trials
    trials or --budget time, whichever ends first.

    Example: tunesmith search examples/sentiment-rotten-tomatoes.yaml --budget 45m
    """
    from tunesmith.config import load_config
    from tunesmith.search.budget import parse_budget
    from tunesmith.search.run import search as run_search

    if trials is not None and trials < 1:
        raise UserError("--trials must be at least 1")
    seconds = parse_budget(budget) if budget is not None else None
    run_search(load_config(config, overrides), trials if trials or seconds else 12, seconds)


@app.command()
def curve(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    sizes: Annotated[
        str, typer.Option(help="Training-set sizes, comma-separated; 'all' for every row.")
    ] = "16,64,256,all",
    seeds: Annotated[int, typer.Option(help="Seeds per size (different rows and initialisation).")] = 1,
    metric: Annotated[Optional[str], typer.Option(help="Validation metric (default: the early-stopping one).")] = None,
) -> None:
    """Learning curve: the validation metric against the number of training rows, with the prompting
    baselines of eval.baselines as lines (table and PNG).

    Example: tunesmith curve examples/sentiment-rotten-tomatoes.yaml --sizes 16,64,256,1024,all --seeds 3
    """
    from tunesmith.config import load_config
    from tunesmith.search.curve import curve as run_curve
    from tunesmith.search.curve import parse_sizes

    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    run_curve(load_config(config, overrides), parse_sizes(sizes), list(range(seeds)), metric)


@app.command()
def report(run: Annotated[Path, typer.Argument(help="Run directory (runs/<name>).")]) -> None:
    """Write RUN/report.html: config, data report, curves, before/after, samples (self-contained, offline).

    Example: tunesmith report runs/sentiment-rotten-tomatoes
    """
    from tunesmith.report.html import write_report

    _console().print(f"Report: {write_report(run)}")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")],
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("compare.html"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """One HTML page with the runs' loss curves overlaid and their validation metrics side by side
    (search trials, curve points and stages are runs too).

    Example: tunesmith compare runs/a runs/b --out compare.html
    """
    from tunesmith.report.compare import check_out
    from tunesmith.report.compare import compare as write_compare

    if len(runs) < 2:
        raise UserError("compare needs at least two run directories")
    check_out(out, overwrite)
    _console().print(f"Compare: {write_compare(runs, out)}")


@app.command()
def runs(folder: Annotated[Path, typer.Argument(help="Directory holding run directories.")] = Path("runs")) -> None:
    """List the runs under a directory: task, model, the main metric before -> after, time, status."""
    commands.runs(folder)


@app.command()
def ui(
    runs: Annotated[Path, typer.Option(help="The runs folder to show and launch into.")] = Path("runs"),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    host: Annotated[str, typer.Option(help="Address to bind; any but loopback needs the access token.")] = "127.0.0.1",
    token: Annotated[Optional[str], typer.Option(help="Access token (default: generated when not loopback).")] = None,
) -> None:
    """A local web app: runs, live curves, compare, and new runs from a YAML form (pip install 'tunesmith[ui]').

    Example: tunesmith ui --runs runs
    """
    from tunesmith.ui import serve

    serve(runs, host, port, token)


@app.command("serve")
def serve_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory of a finished generative run.")],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind; any but loopback needs the API key.")] = "127.0.0.1",
    base: Annotated[bool, typer.Option("--base", help="Serve the run's base model instead (to compare).")] = False,
    api_key: Annotated[
        Optional[str], typer.Option(help="Require 'Authorization: Bearer KEY' (default: generated off loopback).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most concurrent requests answered in one batch.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask (over it: 400).")] = 1024,
) -> None:
    """An OpenAI-compatible endpoint (/v1/chat/completions, streamed or not; /v1/models) for a finished run,
    with its chat template; concurrent requests are answered in batches (pip install 'tunesmith[ui]').

    Example: tunesmith serve runs/alpaca-smollm2 --port 8000
    """
    from tunesmith.serve import serve

    serve(run, host, port, base, api_key, max_batch, max_tokens)


@app.command()
def audit(
    run: Annotated[Path, typer.Argument(help="Run directory (runs/<name>) whose config is audited.")],
    canaries: Annotated[
        bool, typer.Option("--canaries", help="Insert random secrets and measure their exposure.")
    ] = False,
    repetitions: Annotated[str, typer.Option(help="Comma-separated insertion counts.")] = "1,4,16",
    secrets: Annotated[int, typer.Option(help="Secrets per insertion count.")] = 10,
    references: Annotated[int, typer.Option(help="Never-inserted reference secrets to rank against.")] = 10_000,
    epsilon: Annotated[
        float, typer.Option(help="Target epsilon of the DP variant when the run has no privacy block.")
    ] = 8.0,
) -> None:
    """Memorisation audit: retrain the run's config on its data plus canaries, without and with DP, and
    report each canary's exposure (The Secret Sharer) in RUN/audit.json.

    Example: tunesmith audit runs/spanish --canaries
    """
    commands.audit(run, canaries, repetitions, secrets, references, epsilon)


@data_app.command("check")
def data_check(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    preview: Annotated[int, typer.Option(help="Also print each split's first N rows as parsed.")] = 0,
) -> None:
    """Print the data report (rows, bad rows, duplicates, leakage, token lengths) without training.

    Example: tunesmith data check examples/commongen.yaml --preview 3
    """
    commands.data_check(config, overrides, preview)


@config_app.command("keys")
def config_keys() -> None:
    """Every config key: dotted path, type, default and description, from the schema.

    Example: tunesmith config keys | grep -A1 train.lr
    """
    from tunesmith.config import Config
    from tunesmith.config.keys import keys, render

    print(render(keys(Config)), end="")


@config_app.command("show")
def config_show(config: Annotated[Path, typer.Argument(help="YAML config file.")], overrides: Overrides = None) -> None:
    """Print the config as a run would use it: overrides applied, every default filled in, secrets redacted.

    Example: tunesmith config show examples/alpaca-smollm2.yaml train.lr=1e-4
    """
    from tunesmith.config import dump_config, load_config

    print(dump_config(load_config(config, overrides)), end="")


@app.command("models")
def list_models() -> None:
    """List the embedded models: size, architecture, license, installed or not."""
    commands.list_models()


@app.command("generate")
def generate_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory (runs/<name>).")],
    prompt: Annotated[Optional[str], typer.Option(help="One prompt.")] = None,
    input: Annotated[
        Optional[Path],
        typer.Option(
            help="JSONL with prompt/instruction/messages per line; a "
            "constrained-generation run also takes a concepts list."
        ),
    ] = None,
    concepts: Annotated[
        Optional[str],
        typer.Option(
            help="Constrained-generation runs: the concepts, comma-separated; the prompt is built as in training."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    num_candidates: NumCandidates = None,
    decoding: DecodingOverrides = None,
    base: Annotated[
        bool, typer.Option("--base", help="Answer with the run's base model (before the fine-tune), same template.")
    ] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print the answer token by token (one prompt).")] = False,
) -> None:
    """Answer prompts with the fine-tuned model (batched), decoded as the run's eval.decoding says: greedy
    by default, or the best of several candidates, as its evaluation was scored.

    Example: tunesmith generate runs/alpaca-smollm2 --prompt "Give three tips for staying healthy."
    Example: tunesmith generate runs/commongen --concepts dog,frisbee,catch
    Example: tunesmith generate runs/alpaca-smollm2 --base --prompt "Give three tips for staying healthy."
    """
    commands.generate(run, prompt, input, concepts, max_new_tokens, batch_size, num_candidates, decoding, base, stream)


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    merge: Annotated[Optional[Path], typer.Option("--merge", help="Write a standalone HF model directory.")] = None,
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="Write one GGUF file (Llama-family models).")] = None,
    quant: Annotated[str, typer.Option(help="With --gguf: f32, f16 or q8_0.")] = "f16",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing file or non-empty directory (once complete).")
    ] = False,
) -> None:
    """Merge the adapter into the base weights and write a standalone HF model directory (--merge) or a GGUF
    file for llama.cpp and Ollama (--gguf).

    Example: tunesmith export runs/alpaca-smollm2 --gguf alpaca.gguf --quant q8_0
    """
    commands.export(run, merge, gguf, quant, overwrite)


@app.command("predict")
def predict_cmd(
    run: Annotated[Path, typer.Argument(help="Classification run directory (runs/<name>).")],
    input: Annotated[
        Optional[Path], typer.Option(help="JSONL/CSV/Parquet with a text column (or the run's data.columns).")
    ] = None,
    text: Annotated[Optional[str], typer.Option(help="One text to label (instead of --input).")] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(help="Rows per batch (default: the run's eval.batch_size).")
    ] = None,
) -> None:
    """Label every row of a file with a classifier run: one JSON line per row, in order, with the label and
    every label's probability.

    Example: tunesmith predict runs/sentiment-rotten-tomatoes --input reviews.jsonl > predictions.jsonl
    Example: tunesmith predict runs/sentiment-rotten-tomatoes --text "A gripping, funny film."
    """
    from tunesmith.predict import predict

    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if (input is None) == (text is None):
        raise UserError("Give exactly one of --input or --text")
    predict(run, input, batch_size, text=text)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # transformers' own deprecation notices are about its internals, not about anything the user can change
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        app()
    except UserError as err:
        print(f"error: {err.render()}", file=sys.stderr)
        sys.exit(err.exit_code)
    except TrainingHalted as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
