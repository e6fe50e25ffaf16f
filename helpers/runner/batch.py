"""Batch runs: every template × params file × model, in dependency order, skipping runs that are up to date.

A template *reads* another when its source calls ``load_results(<session>, "<template>")``; that is found by
parsing the template, so a new template joins the plan, in the right order, with no code change here.
A run is **up to date** when its fingerprint (the bytes of the template, the params file and the word pools,
the model files, the ``helpers`` modules the run executes (``code_digest``), the run options, and the fingerprints of the runs it reads) equals
the one stamped in ``nb_outputs/<task>/<model>/.runs/<template>.json`` by its last successful run.

Runs execute one after another in this process (``jobs=1``), or as a Dask task graph on a local cluster
(``jobs>1``: one worker process per run slot) or on any Dask scheduler (``scheduler="tcp://..."``; on Slurm,
``dask-jobqueue`` starts the workers). Dask resolves the dependencies: a run is submitted with the futures
of the runs it reads as arguments.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from tqdm.auto import tqdm

from helpers import PARAMS_DIR, POOLS_DIR
from helpers.runner import dependencies
from helpers.runner import run as runner
from helpers.schema import outputs
from helpers.schema.outputs import display_model, model_folder_name, owner
from helpers.task.models import ModelNotAvailable, resolve_model
from helpers.task.params import NotExpressible
from helpers.task.real_models import REAL_MODELS, read_card

OK_STATUSES = ("ok", "up-to-date")


class PlanError(ValueError):
    """The set of templates cannot be ordered (a cycle, or a template reads one that does not exist)."""


@dataclass(frozen=True)
class RunSpec:
    """One run of the plan: a template for a params file and a model."""

    task: str
    params_file: str
    model: str
    template: str
    reads: tuple[str, ...] = ()  # templates of the same task and model whose JSON this one reads
    scope: str = "task"  # "model": the template does not depend on the task and runs once per model

    @property
    def folder(self) -> str:
        """First level of its output folder: the task, or ``_models`` for a per-model template."""
        return owner(self.task, self.scope)

    @property
    def key(self) -> str:
        return f"{self.folder}/{model_folder_name(self.model)}/{self.template}"

    def upstream_keys(self) -> list[str]:
        return [replace(self, template=t, reads=(), scope=outputs.scope_of(t)).key for t in self.reads]


@dataclass(frozen=True)
class RunOptions:
    """Options every run of a batch shares (they are part of each run's fingerprint, except progress)."""

    n_prompts: int | None = None
    threads: int | None = None
    cell_timeout: int | None = None
    device: str | None = None
    extra_parameters: dict = field(default_factory=dict)
    progress: bool = True
    log_output: bool = False  # stream cell outputs to the log (per-cell progress of long cells)

    def fingerprint_fields(self) -> dict:
        return {"n_prompts": self.n_prompts, "device": self.device, "extra": self.extra_parameters}


# ---------------------------------------------------------------- plan


def template_reads(template: str) -> list[str]:
    """Templates whose JSON ``template`` reads: the string arguments of its ``load_results(...)`` calls."""
    tree = ast.parse((outputs.templates_dir() / f"{template}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "load_results":
            found += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return sorted(set(found))


def template_order(templates: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """``templates`` plus every template they read, each after the ones it reads: [(template, reads), ...]."""
    available = outputs.available_templates()
    wanted = list(templates or available)
    graph: dict[str, list[str]] = {}
    while wanted:
        name = wanted.pop()
        if name in graph:
            continue
        if name not in available:
            raise PlanError(f"template {name!r} not found in {outputs.templates_dir()}; available: {available}")
        graph[name] = template_reads(name)
        missing = [t for t in graph[name] if t not in available]
        if missing:
            raise PlanError(
                f"{outputs.templates_dir() / (name + '.py')}: load_results reads {missing}, which is not a template (available: {available})"
            )
        wanted += graph[name]
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise PlanError(f"templates read each other in a cycle: {err.args[1]}") from None
    return [(t, graph[t]) for t in order]


def params_files(tasks: list[str] | None = None, params_dir: Path | None = None) -> list[Path]:
    """The chosen params files: ``tasks`` (names or paths), else every ``*.yaml`` of ``params_dir``."""
    if tasks:
        return [Path(t) if Path(t).suffix in (".yaml", ".yml") else (params_dir or PARAMS_DIR) / f"{t}.yaml" for t in tasks]
    return sorted(Path(params_dir or PARAMS_DIR).glob("*.yaml"))


def plan_runs(
    tasks: list[str] | None = None,
    models: list[str] | None = None,
    templates: list[str] | None = None,
    params_dir: Path | None = None,
    n_prompts: int | None = None,
) -> tuple[list[RunSpec], list[runner.RunResult]]:
    """Runs in dependency order, and one bad-input result per params file (or params × model) that cannot run.

    Each params file is validated, and its prompts built with each model's tokenizer, before anything runs, so a
    broken file is one red row naming the file and field, not one per template.
    """
    order = template_order(templates)
    scopes = {t: outputs.scope_of(t) for t, _ in order}
    runs, rejected, planned = [], [], {}
    for path in params_files(tasks, params_dir):
        for model in models or [None]:  # None: the params file's own model
            try:
                params = runner.check_inputs(str(path), model, n_prompts)
            except NotExpressible as err:
                # the file is fine, this model's tokenizer cannot write the task: with models given on the command line
                # (several models, one set of tasks) that is an expected refusal, not bad input
                status = "refused" if model else "bad-input"
                rejected.append(runner.RunResult(path.stem, model or "?", "(params)", status, 0.0, None, str(err)))
                continue
            except runner.BAD_INPUT as err:
                what = "(model)" if isinstance(err, ModelNotAvailable) else "(params)"
                rejected.append(runner.RunResult(path.stem, model or "?", what, "bad-input", 0.0, None, str(err)))
                continue
            except Exception as err:  # an unforeseen failure of a check: one bad-input row, the batch goes on
                rejected.append(
                    runner.RunResult(
                        path.stem,
                        model or "?",
                        "(params)",
                        "bad-input",
                        0.0,
                        None,
                        f"{path}: could not check it ({type(err).__name__}: {err}); please report this",
                    )
                )
                continue
            for t, reads in order:
                spec = RunSpec(params.task, str(path), params.model, t, tuple(reads), scopes[t])
                if spec.key not in planned:
                    planned[spec.key] = len(runs)
                    runs.append(spec)
                elif spec.params_file < runs[planned[spec.key]].params_file:
                    # a per-model template runs once per model, with the params file that sorts first (whatever the
                    # order the tasks were given in, so it stays up to date)
                    runs[planned[spec.key]] = spec
    return runs, rejected


# ---------------------------------------------------------------- fingerprints


def files_digest(paths: list[Path]) -> str:
    """SHA-256 over the relative names and bytes of ``paths`` (files, or folders taken recursively)."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(str(f.relative_to(root.parent)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def model_digest(model: str) -> str:
    """Digest of a local model folder's files; a hub model is identified by its name, a prepared real model by its
    card (the GGUF's sha256 and the conversion version: hashing 0.5-1 GB of weights for every plan would cost seconds)."""
    if model in REAL_MODELS:
        try:
            source = resolve_model(model)
        except ModelNotAvailable:
            return f"unavailable:{model}"
        card = read_card(model)
        return f"real:{model}:{card['gguf']['sha256']}:{card['conversion_version']}" if card and Path(source).is_dir() else f"hub:{source}"
    try:
        source = resolve_model(model)
    except ModelNotAvailable:
        return f"unavailable:{model}"
    return files_digest([Path(source)]) if Path(source).is_dir() else f"hub:{source}"


def code_digest(template: Path, graph: dict[str, set[str]], package: Path) -> str:
    """Digest of the ``helpers`` modules a run of ``template`` executes: those the template reaches
    (``dependencies.depends_on``) and those that execute and publish it (the runner's, ``run`` and what it imports).
    Editing any other module (the report, the batch planner, test support) leaves the run up to date."""
    modules = dependencies.depends_on(template, graph) | dependencies.closure({"runner.run"}, graph)
    return files_digest([dependencies.path_of(m, package) for m in sorted(modules)])


def fingerprints(runs: list[RunSpec], options: RunOptions, package: Path = dependencies.PACKAGE) -> dict[str, str]:
    """Each run's fingerprint; a run's includes the fingerprints of the runs it reads (plan order). ``package``: the
    ``helpers`` folder whose modules are hashed (``code_digest``)."""
    graph = dependencies.module_graph(package)
    code = {t: code_digest(outputs.templates_dir() / f"{t}.py", graph, package) for t in {r.template for r in runs}}
    pools = files_digest([POOLS_DIR])
    models = {m: model_digest(m) for m in {r.model for r in runs}}
    templates = {t: files_digest([outputs.templates_dir() / f"{t}.py"]) for t in {r.template for r in runs}}
    params = {f: files_digest([Path(f)]) for f in {r.params_file for r in runs}}
    result: dict[str, str] = {}
    for r in runs:
        parts = {
            "template": templates[r.template],
            "params": params[r.params_file],
            "model": models[r.model],
            "code": code[r.template],
            "pools": pools,
            "options": options.fingerprint_fields(),
            "reads": [result[k] for k in r.upstream_keys()],
        }
        result[r.key] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return result


def stamp_path(run: RunSpec) -> Path:
    return outputs.outputs_dir() / run.folder / model_folder_name(run.model) / ".runs" / f"{run.template}.json"


def is_up_to_date(run: RunSpec, fingerprint: str) -> bool:
    """The last successful run had this fingerprint, and its notebook is still there."""
    stamp = stamp_path(run)
    if not stamp.exists() or not (stamp.parent.parent / f"{run.template}.ipynb").exists():
        return False
    return json.loads(stamp.read_text()).get("fingerprint") == fingerprint


def write_stamp(run: RunSpec, fingerprint: str, result: runner.RunResult) -> None:
    stamp = stamp_path(run)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(
        json.dumps(
            {"fingerprint": fingerprint, "seconds": round(result.seconds, 1), "finished": time.time(), "params_file": run.params_file},
            indent=1,
        )
    )


# ---------------------------------------------------------------- execution


def execute_run(run: RunSpec, fingerprint: str, options: RunOptions, *upstream: runner.RunResult) -> runner.RunResult:
    """Run one template (after the runs it reads); skipped when one of those did not succeed."""
    failed = [u for u in upstream if u.status not in OK_STATUSES]
    if failed:
        return runner.RunResult(
            run.folder, run.model, run.template, "skipped", 0.0, None, f"not run: {failed[0].template} (which it reads) {failed[0].status}"
        )
    options = replace(options, device=worker_device(options.device))
    extra = {**options.extra_parameters, **({"device": options.device} if options.device else {})}
    result = runner.run_template(
        run.params_file,
        run.template,
        run.model,
        options.n_prompts,
        options.threads,
        options.cell_timeout,
        options.progress,
        extra,
        options.log_output,
    )
    if result.status == "ok":
        write_stamp(run, fingerprint, result)
    return result


def worker_device(device: str | None) -> str | None:
    """On a Dask worker with CUDA, the GPU of this worker (one run per device); else ``device`` unchanged."""
    if device != "cuda":
        return device
    try:
        import torch
        from distributed import get_worker

        return f"cuda:{int(get_worker().name) % torch.cuda.device_count()}"
    except (ImportError, ValueError, TypeError):
        return device


@dataclass
class BatchReport:
    """What a batch did: every planned run's result, in plan order, and the wall time."""

    results: list[runner.RunResult]
    seconds: float

    @property
    def executed(self) -> list[runner.RunResult]:
        return [r for r in self.results if r.status != "up-to-date"]

    @property
    def ran(self) -> list[runner.RunResult]:
        """The runs that executed a notebook (succeeded or failed)."""
        return [r for r in self.results if r.status in ("ok", "failed")]

    @property
    def exit_code(self) -> int:
        statuses = {r.status for r in self.results}
        return 1 if statuses & {"failed", "skipped"} else 2 if "bad-input" in statuses else 0

    def table(self) -> str:
        """One line per run: status, task, model, template, seconds, message (errors name the file)."""
        rows = [
            (
                r.status,
                r.task,
                display_model(r.model),
                r.template,
                f"{r.seconds:.1f}s",
                "" if r.peak_rss_mb is None else f"{r.peak_rss_mb / 1024:.2f} GB",
                r.message.replace("\n", " | "),
            )
            for r in self.results
        ]
        head = ["status", "task", "model", "template", "time", "peak RSS"]
        widths = [max(len(row[i]) for row in rows + [(*head, "")]) for i in range(len(head))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  message"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
        counts = {s: sum(r.status == s for r in self.results) for s in ("ok", "up-to-date", "failed", "bad-input", "skipped", "refused")}
        lines.append(f"{len(self.results)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" · wall {self.seconds:.1f}s")
        unperformed = sorted({f"{r.task}/{display_model(r.model)}" for r in self.results if r.message.startswith("task NOT performed")})
        if unperformed:
            lines.append(f"the model does not do the task (task check failed) for: {', '.join(unperformed)}")
        if not [r for r in self.results if r.status == "ok"] and not self.exit_code:
            lines.append("nothing executed: every run is up to date (use --force to rerun)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "seconds": self.seconds,
            "finished": time.time(),
            "runs": [{**asdict(r), "out_dir": str(r.out_dir) if r.out_dir else None} for r in self.results],
        }


def run_batch(
    tasks: list[str] | None = None,
    models: list[str] | None = None,
    templates: list[str] | None = None,
    options: RunOptions | None = None,
    jobs: int = 1,
    scheduler: str | None = None,
    force: bool = False,
    params_dir: Path | None = None,
) -> BatchReport:
    """Plan, skip what is up to date, execute the rest (in dependency order), and summarise.

    ``jobs > 1`` starts a local Dask cluster with ``jobs`` single-threaded worker processes; ``scheduler`` is a
    Dask scheduler address, or ``"inprocess"`` for a cluster of threads in this process (tests).
    """
    t0 = time.time()
    options = options or RunOptions()
    runs, results = plan_runs(tasks, models, templates, params_dir, options.n_prompts)
    prints = fingerprints(runs, options)
    fresh = {
        r.key: runner.RunResult(
            r.folder,
            r.model,
            r.template,
            "up-to-date",
            0.0,
            stamp_path(r).parent.parent,
            runner.task_note(stamp_path(r).parent.parent / f"{r.template}.json"),
        )
        for r in runs
        if not force and is_up_to_date(r, prints[r.key])
    }
    todo = [r for r in runs if r.key not in fresh]
    jobs = jobs_for_device(jobs, options.device) if not scheduler else jobs
    if todo and (jobs > 1 or scheduler):
        if options.threads is None:
            options = replace(options, threads=max(1, (os.cpu_count() or 1) // max(jobs, 1)))
        done = run_on_dask(todo, prints, replace(options, progress=False), fresh, jobs, scheduler)
    else:
        done = run_in_process(todo, prints, options, fresh)
    by_key = {**fresh, **done}
    return BatchReport(results + [by_key[r.key] for r in runs], time.time() - t0)


def jobs_for_device(jobs: int, device: str | None) -> int:
    """With ``device="cuda"``, at most one local job per GPU (each worker owns ``cuda:<worker index>``)."""
    if device != "cuda":
        return jobs
    import torch

    gpus = torch.cuda.device_count()
    if gpus and jobs > gpus:
        print(f"-j {jobs} with {gpus} GPU(s): running {gpus} at once, one per device")
        return gpus
    return jobs


def run_in_process(
    todo: list[RunSpec], prints: dict[str, str], options: RunOptions, fresh: dict[str, runner.RunResult]
) -> dict[str, runner.RunResult]:
    """Execute ``todo`` one after another (plan order is dependency order); papermill shows per-cell progress."""
    done: dict[str, runner.RunResult] = {}
    bar = tqdm(todo, desc="runs", unit="run", disable=not todo)
    for run in bar:
        bar.set_postfix_str(run.key)
        upstream = [done.get(k) or fresh[k] for k in run.upstream_keys()]
        done[run.key] = execute_run(run, prints[run.key], options, *upstream)
        bar.write(f"[{done[run.key].status}] {run.key} ({done[run.key].seconds:.1f}s)")
    return done


def run_on_dask(
    todo: list[RunSpec], prints: dict[str, str], options: RunOptions, fresh: dict[str, runner.RunResult], jobs: int, scheduler: str | None
) -> dict[str, runner.RunResult]:
    """Submit ``todo`` as a Dask graph (each run gets the futures of the runs it reads) and gather the results."""
    from distributed import Client, LocalCluster, as_completed

    if scheduler and scheduler != "inprocess":
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=max(jobs, 1), threads_per_worker=1, processes=scheduler != "inprocess", dashboard_address=None)
        client = Client(cluster)
    with client:
        futures = {}
        for run in todo:
            upstream = [futures.get(k) or fresh[k] for k in run.upstream_keys()]
            futures[run.key] = client.submit(execute_run, run, prints[run.key], options, *upstream, key=f"run:{run.key}", pure=False)
        done = {}
        with tqdm(total=len(futures), desc="runs", unit="run") as bar:
            for future in as_completed(list(futures.values())):
                result = future.result()
                key = future.key.removeprefix("run:")
                done[key] = result
                bar.update()
                bar.write(f"[{result.status}] {key} ({result.seconds:.1f}s)")
        if client.cluster is not None:
            client.cluster.close()
    return done
