"""Batch runner: dependency order found in the templates, skipping up-to-date runs, failure isolation, Dask.

Small stand-in templates (written to a temp folder, picked up with no code change) keep these tests fast; the
real templates run through the batch runner in test_notebooks.py.
"""

from __future__ import annotations

import json
import os

import nbformat
import pytest

from helpers.runner import batch, cli
from helpers.runner import run as runner
from helpers.schema import outputs, results

HEADER = """\
# %% tags=["parameters"]
task = "ioi"
params_file = None
model_name = None
n_prompts = None
output_dir = None
input_dir = None
threads = None
"""
SESSION = 's = session.start_session("{name}", task, params_file, model_name, n_prompts, output_dir, None, threads, False, input_dir)\n'
TEMPLATES = {
    "first": HEADER
    + "\n# %%\nfrom helpers.notebook import session\nfrom helpers.schema import artifacts\n"
    + SESSION.format(name="first")
    + 'artifacts.write_json(s.out_dir / "first.json", {"template": "first", "task": s.params.task, "n": len(s.prompts.clean_tokens)})\n',
    "second": HEADER
    + "\n# %%\nfrom helpers.notebook import session\nfrom helpers.schema import artifacts\n"
    + SESSION.format(name="second")
    + 'first = session.load_results(s, "first")\n'
    'artifacts.write_json(s.out_dir / "second.json", {"template": "second", "read": first.task, "n": first.n})\n',
    "boom": HEADER + '\n# %%\nraise RuntimeError("boom: deliberate failure")\n',
    "after_boom": HEADER
    + "\n# %%\nfrom helpers.notebook import session\n"
    + SESSION.format(name="after_boom")
    + 'session.load_results(s, "boom")\n',
    "slow": HEADER + "\n# %%\nimport time\ntime.sleep(120)\n",
    # the system's out-of-memory killer, as it ends a kernel: SIGKILL after the kernel grew
    "oom": HEADER
    + "\n# %%\nimport os, signal, time\nballast = b'x' * (300 * 2**20)\ntime.sleep(1.5)\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "figs": HEADER
    + "\n# %%\nimport plotly.graph_objects as go\nfrom helpers.notebook import session\n"
    + SESSION.format(name="figs").replace("threads, False", "threads, True")  # static images
    + 'for name in ("a", "b"):\n    s.figures.show(go.Figure(go.Bar(y=[1, 2])), name, key=True)\n'
    + 'print("wrote", s.write_results("figs", {"template": "figs", "model": s.model_name, "figures": s.figures.saved, '
    + '"key_figures": s.figures.key}))\n',
    "per_model": "# ---\n# jupyter:\n#   circuit_lab:\n#     scope: model\n# ---\n\n"
    + HEADER
    + "\n# %%\nfrom helpers.notebook import session\n"
    + SESSION.format(name="per_model")
    + 'print("wrote", s.write_results("per_model", {"template": "per_model", "task": s.params.task}))\n',
}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A templates folder with the stand-ins and an empty outputs folder, seen by Dask workers through the env."""
    templates = tmp_path / "templates"
    templates.mkdir()
    for name, text in TEMPLATES.items():
        (templates / f"{name}.py").write_text(text)
    monkeypatch.setenv("CIRCUIT_LAB_TEMPLATES", str(templates))
    monkeypatch.setenv("CIRCUIT_LAB_OUTPUTS", str(tmp_path / "out"))
    return tmp_path


def statuses(report: batch.BatchReport) -> dict[str, str]:
    return {f"{r.task}/{r.template}": r.status for r in report.results}


def test_a_run_reruns_when_the_code_it_executes_changes_and_only_then(tmp_path):
    """A run's fingerprint covers the helpers modules its template reaches and the runner's, not all of helpers/:
    editing the report leaves every run up to date, editing discovery makes circuit_discovery and minimal_circuit
    (which reads it) stale and nothing else, editing the engine makes every run that uses it stale."""
    import shutil

    from helpers.runner import dependencies

    package = tmp_path / "helpers"
    shutil.copytree(dependencies.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    runs, _ = batch.plan_runs([str(runner.PROJECT_ROOT / "params" / "ioi.yaml")], models=["toy-ioi"])
    options = batch.RunOptions()
    base = batch.fingerprints(runs, options, package)

    def stale_after(module: str) -> set[str]:
        path = dependencies.path_of(module, package)
        path.write_text(path.read_text() + "\n# edited\n")
        now = batch.fingerprints(runs, options, package)
        base.update(now)
        return {k.split("/")[-1] for k in now if now[k] != before[k]}

    before = dict(base)
    assert stale_after("runner.report") == set()
    before = dict(base)
    assert stale_after("analyses.discovery") == {"circuit_discovery", "minimal_circuit"}
    before = dict(base)
    assert stale_after("engine.interventions") == {r.template for r in runs}
    before = dict(base)
    assert stale_after("methods.patching") == {r.template for r in runs} - {"induction_checks"}  # repeated tokens: no sweeps
    before = dict(base)
    assert stale_after("runner.run") == {r.template for r in runs}  # the runner executes and publishes every run


def test_real_templates_are_ordered_by_what_they_read():
    order = batch.template_order()
    names = [t for t, _ in order]
    assert dict(order)["head_functions"] == ["circuit_expms"]
    assert sorted(dict(order)["minimal_circuit"]) == ["circuit_discovery", "circuit_expms", "head_functions"]
    assert names.index("circuit_expms") < names.index("head_functions") < names.index("minimal_circuit")
    assert names.index("circuit_discovery") < names.index("minimal_circuit")
    assert dict(order)["induction_checks"] == [] and dict(order)["circuit_discovery"] == []
    # asking for one template brings in what it reads, and nothing else
    assert [t for t, _ in batch.template_order(["minimal_circuit"])] == [
        "circuit_discovery",
        "circuit_expms",
        "head_functions",
        "minimal_circuit",
    ]


def test_plan_errors_name_the_problem(sandbox):
    (sandbox / "templates" / "loop_a.py").write_text(HEADER + 'session.load_results(s, "loop_b")\n')
    (sandbox / "templates" / "loop_b.py").write_text(HEADER + 'session.load_results(s, "loop_a")\n')
    (sandbox / "templates" / "orphan.py").write_text(HEADER + 'session.load_results(s, "nowhere")\n')
    with pytest.raises(batch.PlanError, match="cycle"):
        batch.template_order(["loop_a"])
    with pytest.raises(batch.PlanError, match="orphan.py.*nowhere"):
        batch.template_order(["orphan"])
    with pytest.raises(batch.PlanError, match="not found"):
        batch.template_order(["no_such_template"])


def test_fingerprint_follows_params_template_model_and_upstream(sandbox, tmp_path):
    params = tmp_path / "ioi.yaml"
    params.write_text((runner.PROJECT_ROOT / "params" / "ioi.yaml").read_text())
    runs, _ = batch.plan_runs([str(params)], templates=["second"])
    base = batch.fingerprints(runs, batch.RunOptions())
    assert base == batch.fingerprints(runs, batch.RunOptions())  # deterministic
    assert base != batch.fingerprints(runs, batch.RunOptions(n_prompts=8))
    params.write_text(params.read_text() + "\n# edited\n")
    edited = batch.fingerprints(runs, batch.RunOptions())
    assert all(edited[k] != base[k] for k in base)
    (sandbox / "templates" / "first.py").write_text(TEMPLATES["first"] + "# edited\n")
    upstream_edit = batch.fingerprints(runs, batch.RunOptions())
    assert all(upstream_edit[k] != edited[k] for k in base), "a change upstream must make the reader stale too"
    other_model = batch.plan_runs([str(params)], models=["toy-induction"], templates=["second"])[0]
    assert set(batch.fingerprints(other_model, batch.RunOptions()).values()).isdisjoint(upstream_edit.values())


def test_dask_in_process_cluster_isolates_failures_then_reruns_skip(sandbox):
    opts = batch.RunOptions(n_prompts=4, threads=1)
    report = batch.run_batch(["ioi", "numseq"], templates=["second", "after_boom"], options=opts, jobs=2, scheduler="inprocess")
    assert statuses(report) == {
        f"{t}/{name}": s
        for t in ("ioi", "numseq")
        for name, s in [("first", "ok"), ("boom", "failed"), ("second", "ok"), ("after_boom", "skipped")]
    }
    assert report.exit_code == 1
    out = sandbox / "out"
    for task in ("ioi", "numseq"):
        second = json.loads((out / task / "toy-ioi" / "second.json").read_text())
        assert second == {"template": "second", "read": task, "n": 4}  # it ran after first and read its JSON
        kept = nbformat.read(out / ".failed" / task / "toy-ioi" / "boom.ipynb", as_version=4)
        assert any(o.output_type == "error" for c in kept.cells for o in c.get("outputs", []))
    table = report.table()
    assert "boom: deliberate failure" in table and "not run: boom (which it reads) failed" in table

    again = batch.run_batch(["ioi", "numseq"], templates=["second", "after_boom"], options=opts)
    assert {k: s for k, s in statuses(again).items() if "boom" not in k} == {
        f"{t}/{n}": "up-to-date" for t in ("ioi", "numseq") for n in ("first", "second")
    }
    assert statuses(again)["ioi/boom"] == "failed", "a failed run is never up to date"

    quiet = batch.run_batch(["ioi", "numseq"], templates=["second"], options=opts)
    assert {r.status for r in quiet.results} == {"up-to-date"} and quiet.exit_code == 0 and not quiet.executed
    assert "nothing executed" in quiet.table()

    (sandbox / "templates" / "first.py").write_text(TEMPLATES["first"] + "# edited\n")
    edited = batch.run_batch(["ioi"], templates=["second"], options=opts)
    assert statuses(edited) == {"ioi/first": "ok", "ioi/second": "ok"}


def test_a_per_model_template_runs_once_per_model(sandbox):
    """``circuit_lab: {scope: model}`` in a template's metadata: one run per model whatever the tasks, into
    ``_models/<model>/``, with no task check (its results do not depend on the task)."""
    assert outputs.scope_of("per_model") == "model" and outputs.scope_of("first") == "task"
    runs, _ = batch.plan_runs(["ioi", "numseq"], templates=["per_model", "first"])
    assert sorted(r.key for r in runs) == ["_models/toy-ioi/per_model", "ioi/toy-ioi/first", "numseq/toy-ioi/first"]
    report = batch.run_batch(["ioi", "numseq"], templates=["per_model"], options=batch.RunOptions(n_prompts=4, threads=1, progress=False))
    assert statuses(report) == {"_models/per_model": "ok"}
    written = json.loads((sandbox / "out" / "_models" / "toy-ioi" / "per_model.json").read_text())
    assert written == {"schema_version": results.SCHEMA_VERSION, "template": "per_model", "task": "ioi"}
    assert not (sandbox / "out" / "ioi" / "toy-ioi").exists()
    again = batch.run_batch(["numseq", "ioi"], templates=["per_model"], options=batch.RunOptions(n_prompts=4, threads=1, progress=False))
    assert statuses(again) == {"_models/per_model": "up-to-date"}


def test_figures_a_starved_renderer_could_not_write_are_reported_and_rendered_later(sandbox, monkeypatch):
    """A browser that times out on every figure: the run still succeeds, and its summary row, its results JSON
    (``figures_missing``) and its report card say which figures are missing; they are kept as plotly JSON, and the
    report renders them once the browser works (the JSON and the card then say nothing is missing)."""
    from PIL import Image

    from helpers.notebook import figures
    from helpers.runner import report

    fake_browser = sandbox / "chromium"
    fake_browser.write_text("")
    monkeypatch.setenv("BROWSER_PATH", str(fake_browser))  # the kernel leaves its figures to this process

    def starved(fig, path, scale=1.5):
        raise TimeoutError("kaleido's shared browser did not answer in 120 s")

    monkeypatch.setattr(figures, "write_image", starved)
    result = batch.run_batch(["ioi"], templates=["figs"], options=batch.RunOptions(n_prompts=4, threads=1, progress=False))
    (run,) = result.results
    assert run.status == "ok" and "2 of 2 figures not rendered (a.png: TimeoutError" in run.message, run.message
    assert "make report" in run.message
    folder = sandbox / "out" / "ioi" / "toy-ioi"
    written = json.loads((folder / "figs.json").read_text())
    assert written["figures"] == ["figs_figures/a.png", "figs_figures/b.png"] == written["figures_missing"]
    page = report.write_report(sandbox / "out").read_text()
    assert "2 of 2 figures not rendered" in page and "a.png, b.png" in page

    monkeypatch.setattr(figures, "write_image", lambda fig, path, scale=1.5: Image.new("RGB", (4, 4)).save(path))
    page = report.write_report(sandbox / "out").read_text()
    assert "not rendered" not in page and page.count("data:image/png;base64") == 2
    assert "figures_missing" not in json.loads((folder / "figs.json").read_text())
    assert sorted(p.name for p in (folder / "figs_figures").iterdir()) == ["a.png", "b.png"]


def test_cell_timeout_fails_the_run(sandbox):
    report = batch.run_batch(["ioi"], templates=["slow"], options=batch.RunOptions(cell_timeout=3, progress=False))
    (result,) = report.results
    assert result.status == "failed" and "Timeout" in result.message, result.message
    assert report.exit_code == 1


def test_the_runner_leaves_the_environment_as_it_found_it(sandbox, monkeypatch):
    """What the runner sets for its kernels (quiet progress, warning filters, deferred figures) is restored when the
    run ends, so nothing later in the process sees it."""
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    monkeypatch.delenv("CIRCUIT_LAB_PROGRESS", raising=False)
    before = dict(os.environ)
    report = batch.run_batch(["ioi"], templates=["first"], options=batch.RunOptions(n_prompts=4, threads=1, progress=False))
    assert statuses(report) == {"ioi/first": "ok"} and dict(os.environ) == before


def test_cli_runs_the_batch_and_writes_the_report(sandbox, capsys):
    code = cli.main(["--task", "ioi", "--template", "first", "--n-prompts", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "1 runs: 1 ok" in out, out
    assert (sandbox / "out" / "index.html").exists() and (sandbox / "out" / "runs.json").exists()
    assert cli.main(["--task", "ioi", "--template", "first", "--n-prompts", "4"]) == 0
    assert "nothing executed" in capsys.readouterr().out
    assert cli.main(["--template", "no_such_template"]) == 2


def test_one_local_job_per_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert batch.jobs_for_device(4, "cuda") == 2 and batch.jobs_for_device(1, "cuda") == 1
    assert batch.jobs_for_device(4, "cpu") == 4 and batch.jobs_for_device(4, None) == 4
    assert batch.worker_device("cuda") == "cuda"  # not on a Dask worker: unchanged


def test_template_metadata_is_read_as_jupytext_reads_it(tmp_path):
    import jupytext

    from helpers.schema import outputs

    for source in sorted(outputs.templates_dir().glob("*.py")):
        assert outputs.notebook_metadata(source) == jupytext.read(source).metadata, source.name
    assert outputs.template_scope(outputs.templates_dir() / "induction_checks.py") == "model"
    plain = tmp_path / "plain.py"
    plain.write_text("# %%\nx = 1\n")
    assert outputs.notebook_metadata(plain) == {} and outputs.template_scope(plain) == "task"


def test_a_killed_kernel_is_reported_as_killed_with_its_memory(sandbox):
    """A kernel the system kills (out of memory) is named as such, with the memory it held, not a bare 'Kernel died';
    every run that executes records its kernel's peak memory."""
    result = runner.run_template("ioi", "oom", progress=False)
    assert result.status == "failed"
    assert "killed by the system, probably out of memory" in result.message and "lower n_prompts" in result.message
    assert "in cell 2 (import os, signal, time)" in result.message  # the cell that grew is named
    assert result.peak_rss_mb is not None and result.peak_rss_mb > 300
    ok = runner.run_template("ioi", "first", progress=False)
    assert ok.status == "ok" and ok.peak_rss_mb > 50
    import nbformat

    published = nbformat.read(ok.out_dir / "first.ipynb", as_version=4)
    meta = published.metadata["circuit_lab"]
    assert meta["peak_rss_mb"] == ok.peak_rss_mb
    code = [c for c in published.cells if c.cell_type == "code"]
    cell_peaks = [c.metadata["circuit_lab"]["peak_rss_mb"] for c in code]
    assert len(cell_peaks) == len(code) and 0 < max(cell_peaks) <= ok.peak_rss_mb  # each cell's own peak
    assert meta["heaviest_cell"]["peak_rss_mb"] == max(cell_peaks)
