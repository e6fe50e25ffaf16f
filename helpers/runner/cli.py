"""The command lines, on top of everything else (nothing in ``helpers`` imports this module).

- ``python -m helpers.runner.run`` (``make run``, ``make all``): ``main``, every template for every params file by
  default, through the batch planner, then the report.
- ``python -m helpers.task.params FILES`` : ``check_params``, every check a run makes before its first cell.
- ``python -m helpers.runner.report`` rebuilds the report (``helpers.runner.report.main``), ``python -m helpers.runner.workcopy``
  copies a template as a researcher's own notebook.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from helpers import PARAMS_DIR
from helpers.runner.batch import PlanError, RunOptions, run_batch
from helpers.runner.report import write_report
from helpers.runner.run import BAD_INPUT, check_inputs
from helpers.schema.outputs import outputs_dir
from helpers.task.params import load_params

RUN_DESCRIPTION = """Execute templates headlessly: every template for every params file by default (make all).

Runs go through the batch planner (helpers.runner.batch): templates in dependency order, up-to-date runs skipped, each
run checked before its first cell and published atomically (helpers.runner.run), then the report (helpers.runner.report)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m helpers.runner.run``: every template for every params file by default (what ``make all`` runs)."""
    parser = argparse.ArgumentParser(description=RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", action="append", help="task name (params/<task>.yaml) or params file; repeat; default: all")
    parser.add_argument("--params-dir", type=Path, default=None, help="folder of params files (default params/)")
    parser.add_argument("--model", action="append", help="model(s) instead of each params file's own (bundled name, dir, hub name)")
    parser.add_argument("--template", action="append", help="template(s) to run, plus the ones they read; default: all")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="runs at once (a local Dask cluster of N processes)")
    parser.add_argument("--scheduler", default=None, help="address of a Dask scheduler to run on (e.g. one dask-jobqueue started)")
    parser.add_argument("--force", action="store_true", help="rerun runs that are up to date")
    parser.add_argument("--n-prompts", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: cores / jobs)")
    parser.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell before a run fails")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA if available); with -j, one run per GPU")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="model dtype (default float32; half precision halves memory, identities then hold to ~1e-2)",
    )
    parser.add_argument("--log-output", action="store_true", help="stream each cell's output (e.g. the sweeps' tqdm bars) to stderr")
    parser.add_argument("--outputs-dir", type=Path, default=None, help="instead of nb_outputs/")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite <outputs>/index.html")
    args = parser.parse_args(argv)
    if args.outputs_dir:
        os.environ["CIRCUIT_LAB_OUTPUTS"] = str(args.outputs_dir.resolve())
    if args.log_output:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("papermill").setLevel(logging.INFO)
    options = RunOptions(
        args.n_prompts,
        args.threads,
        args.cell_timeout,
        args.device,
        log_output=args.log_output,
        extra_parameters={"dtype": args.dtype} if args.dtype else {},
    )
    try:
        batch = run_batch(args.task, args.model, args.template, options, args.jobs, args.scheduler, args.force, args.params_dir)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(batch.table())
    if not args.no_report and batch.ran:  # a batch that executed nothing writes nothing
        print("report:", write_report(outputs_dir(), batch))
    return batch.exit_code


def check_params(argv: list[str] | None = None) -> int:
    """Check params files with every check a run makes before its first cell; exit 1 on any error.

    For each file: the schema and pools, the model (the file's own, or ``--model``) available here and complete,
    circuit heads / layer groups / top_k against the model's shape, and the prompts built with its tokenizer
    (single-token answers, equal lengths, pool words kept). GPT-2 hub names use the shipped tokenizer, so
    ``python -m helpers.task.params params/*.yaml --model gpt2-small`` works offline. ``--schema-only`` skips the model.
    """
    parser = argparse.ArgumentParser(description="Check params files as a run would, before its first cell.")
    parser.add_argument("files", nargs="*")
    parser.add_argument("--model", default=None, help="check against this model instead of each file's own")
    parser.add_argument("--schema-only", action="store_true", help="only the schema and pools (no model, no tokenizer)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    status = 0
    for f in args.files or sorted(str(p) for p in PARAMS_DIR.glob("*.yaml")):
        try:
            p = load_params(f, model=args.model) if args.schema_only else check_inputs(f, args.model, need_weights=False)
            how = "schema" if args.schema_only else f"prompts built with {p.model}'s tokenizer"
            print(f"{f}: ok (task {p.task}, model {p.model}, {p.n_prompts} prompts; {how})")
        except BAD_INPUT as err:
            print(err, file=sys.stderr)
            status = 1
    return status
