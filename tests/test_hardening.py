"""Bad input is one clear line before any work; outputs are never damaged; runs are crash-safe and exclusive.

Every case of the table goes through the command line's entry point (``helpers.runner.cli.main``) with an outputs
folder that already holds a published result: the exit code must be 2, the message must name the file, the
field and a fix, nothing may raise, and the outputs folder must be byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from test_batch import HEADER  # the stand-in templates' parameters cell

from helpers import MODELS_DIR, PARAMS_DIR, POOLS_DIR
from helpers.runner import cli
from helpers.runner import run as runner
from helpers.schema import outputs

GOOD = yaml.safe_load((PARAMS_DIR / "ioi.yaml").read_text())
TEMPLATE = (
    HEADER
    + """
# %%
import json, pathlib, time
pathlib.Path(output_dir, "first.json").write_text(json.dumps({"task": task, "t": time.time()}))
(pathlib.Path(output_dir) / "first_figures").mkdir()
pathlib.Path(output_dir, "first_figures", "a.txt").write_text("figure")
"""
)


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root`` (folders included by their files)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A templates folder with one quick template, an outputs folder holding an earlier result and a report,
    and a copy of the word pools the cases may add bad pools to."""
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "first.py").write_text(TEMPLATE)
    out = tmp_path / "out"
    (out / "ioi" / "toy-ioi" / "first_figures").mkdir(parents=True)
    (out / "ioi" / "toy-ioi" / "first.json").write_text('{"old": true}')
    (out / "ioi" / "toy-ioi" / "first_figures" / "a.txt").write_text("old figure")
    (out / "index.html").write_text("<html>old report</html>")
    (out / "runs.json").write_text('{"runs": []}')
    pools = tmp_path / "pools"
    shutil.copytree(POOLS_DIR, pools)
    monkeypatch.setattr("helpers.task.params.POOLS_DIR", pools)
    monkeypatch.setattr("helpers.task.vocab.POOLS_DIR", pools)
    monkeypatch.setenv("CIRCUIT_LAB_TEMPLATES", str(templates))
    monkeypatch.setenv("CIRCUIT_LAB_OUTPUTS", str(out))
    return tmp_path


def params_text(**changes) -> str:
    data = dict(GOOD, n_prompts=8)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return yaml.safe_dump(data)


def with_pool(name: str, content: bytes, **changes):
    """A case whose S3 slot reads pool ``name`` with the given bytes."""
    return {"pools": {name: content}, "text": params_text(slots={**GOOD["slots"], "S3": name}, **changes)}


def model_folder(files: list[str]):
    return {"model_files": files, "text": None}


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b]\n"
CASES = {
    # encodings and file kinds
    "latin-1 bytes": ({"raw": (params_text(description=None) + "description: café\n").encode("latin-1")}, "line", "UTF-8"),
    "binary garbage": ({"raw": bytes(range(256)) * 4}, "binary", "UTF-8 text"),
    "empty file": ({"raw": b""}, "top level", "task: ..."),
    "huge file": ({"raw": b"# padding\n" * 150_000}, "too large", "right file"),
    "a folder, not a file": ({"folder": True}, "not a file", "params"),
    # YAML oddities
    "syntax error": ({"raw": b"task: ioi\ntemplate: [unclosed\n"}, "not valid YAML", "line"),
    "duplicate key": ({"raw": (params_text() + "n_prompts: 9\n").encode()}, "duplicate key 'n_prompts'", "keep one"),
    "alias bomb": ({"raw": ALIAS_BOMB.encode()}, "anchors and aliases", "write the value out"),
    "python tag": ({"raw": b"task: !!python/object/apply:os.system ['echo hi']\n"}, "not valid YAML", "python/object"),
    "top-level list": ({"raw": b"- task\n- ioi\n"}, "top level", "mapping"),
    "non-text field name": ({"raw": (params_text() + "1: x\n").encode()}, "field names must be text", "[1]"),
    # types and ranges
    "n_prompts not a number": ({"text": params_text(n_prompts="many")}, "n_prompts", "integer"),
    "n_prompts zero": ({"text": params_text(n_prompts=0)}, "n_prompts", "greater than or equal to 1"),
    "n_prompts huge": ({"text": params_text(n_prompts=10**6)}, "n_prompts", "less than or equal to 4096"),
    "seed negative": ({"text": params_text(seed=-1)}, "seed", "greater than or equal to 0"),
    "seed over 32 bits": ({"text": params_text(seed=2**70)}, "seed", "less than 4294967296"),
    "template a number": ({"text": params_text(template=123)}, "template", "string"),
    "slots a list": ({"text": params_text(slots=["names"])}, "slots", "dictionary"),
    "unknown field": ({"text": params_text(colour="red")}, "colour", "spelling"),
    "missing template": ({"text": params_text(template=None)}, "template", "required field"),
    "template without slots": ({"text": params_text(template="When Mary went to")}, "template", "[S1]-style slot"),
    # names and paths
    "task escapes": ({"text": params_text(task="../evil")}, "task", "letters, digits"),
    "task with a slash": ({"text": params_text(task="a/b")}, "task", "letters, digits"),
    "model '..'": ({"text": params_text(model="..")}, "lacks config.json", "save_pretrained"),
    "model a system folder": ({"text": params_text(model="/etc")}, "lacks config.json", "save_pretrained"),
    "model unknown offline": ({"text": params_text(model="no-such-org/no-such-model")}, "not available offline", "Bundled models"),
    "model folder with only config.json": (model_folder(["config.json"]), "lacks weights", "save_pretrained"),
    "pool name is a path": ({"text": params_text(slots={**GOOD["slots"], "S3": "../../requirements"})}, "slots", "not a pool name"),
    "pool missing": ({"text": params_text(slots={**GOOD["slots"], "S3": "nosuchpool"})}, "slots", "nosuchpool"),
    # pools
    "pool empty": (with_pool("emptypool", b"# nothing here\n\n"), "emptypool", "one word per line"),
    "pool not UTF-8": (with_pool("latinpool", "café\nbar\n".encode("latin-1")), "latinpool", "UTF-8"),
    "pool binary": (with_pool("binpool", b"\x00\x01\x02garbage"), "binpool", "binary"),
    "pool of multi-token words": (with_pool("longpool", b"supercalifragilistic\nantidisestablishment\n"), "longpool", "single-token"),
    # consistency and the model's shape
    "corruption names an absent slot": (
        {"text": params_text(corrupted_template=None, corruption="resample:S9")},
        "corruption",
        "name a slot",
    ),
    "circuit head outside the model": ({"text": params_text(circuit={"groups": {"mover": ["L9H0"]}})}, "circuit.groups.mover", "L0-L3"),
    "circuit head index too large": ({"text": params_text(circuit={"groups": {"mover": ["L1H7"]}})}, "circuit.groups.mover", "H0-H3"),
    "top_k above the head count": ({"text": params_text(analysis={"top_k": 40})}, "analysis.top_k", "at most 16"),
    "layer group outside the model": (
        {"text": params_text(analysis={"layer_groups": {"late": [3, 7]}})},
        "analysis.layer_groups.late",
        "layers 0-3",
    ),
    "layer group empty": ({"text": params_text(analysis={"layer_groups": {"late": []}})}, "layer_groups", "at least one"),
    "two-token answer": ({"text": params_text(correct=" [S1] and")}, "correct", "one known token"),
    "more prompts than the pools allow": (
        {"text": params_text(n_prompts=3000, slots={s: "days" for s in GOOD["slots"]})},
        "n_prompts",
        "add words",
    ),
    "corrupted length differs": (
        {"text": params_text(corrupted_template="When [S1] went to the [S3], [S5] gave a [S4] to")},
        "same token length",
        "mirror",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_outputs_stay_identical(world, case, capsys):
    spec, field, fix = CASES[case]
    path = world / "case.yaml"
    if spec.get("folder"):
        path.mkdir()
    elif spec.get("raw") is not None:
        path.write_bytes(spec["raw"])
    elif spec.get("model_files"):
        folder = world / "halfmodel"
        folder.mkdir()
        for name in spec["model_files"]:
            shutil.copy(MODELS_DIR / "toy-ioi" / name, folder / name)
        path.write_text(params_text(model=str(folder)))
    else:
        path.write_text(spec["text"])
    for name, content in spec.get("pools", {}).items():
        (world / "pools" / f"{name}.txt").write_bytes(content)
    before = tree_digest(world / "out")
    code = cli.main(["--task", str(path), "--template", "first"])
    out, err = capsys.readouterr()
    text = out + err
    assert code == 2, text
    assert "bad-input" in text and "Traceback" not in text, text
    assert str(path) in text or "halfmodel" in text or "pool" in text, text
    assert field in text and fix in text, text
    assert tree_digest(world / "out") == before, "a run that executed nothing changed the outputs folder"


def test_check_command_runs_every_check_a_run_makes(world, capsys):
    from helpers.runner.cli import check_params as main

    bad = world / "bad.yaml"
    bad.write_text(params_text(circuit={"groups": {"mover": ["L9H0"]}}))
    good = world / "good.yaml"
    good.write_text(params_text())
    assert main([str(good)]) == 0
    assert main([str(bad), str(good)]) == 1
    captured = capsys.readouterr()
    assert "circuit.groups.mover" in captured.err and f"{good}: ok" in captured.out


def test_batch_with_one_bad_file_runs_the_good_ones(world, capsys):
    folder = world / "tasks"
    folder.mkdir()
    (folder / "good.yaml").write_text(params_text())
    (folder / "broken.yaml").write_text(params_text(corrupted_template=None, corruption="resample:S9"))
    (folder / "latin.yaml").write_bytes((params_text(task="latin", description=None) + "description: café\n").encode("latin-1"))
    code = cli.main(["--params-dir", str(folder), "--template", "first"])
    out = capsys.readouterr().out
    assert code == 2 and "Traceback" not in out, out
    rows = [line.split() for line in out.splitlines()]
    assert sorted(r[1] for r in rows if r and r[0] == "bad-input") == ["broken", "latin"], out
    assert [r[1:4] for r in rows if r and r[0] == "ok"] == [["ioi", "toy-ioi", "first"]], out
    assert json.loads((world / "out" / "ioi" / "toy-ioi" / "first.json").read_text())["task"] == "ioi"


def test_read_only_outputs_fail_before_running(world, monkeypatch, capsys):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == world / "out" / "ioi" / "toy-ioi" else real_access(p, mode))
    path = world / "case.yaml"
    path.write_text(params_text())
    before = tree_digest(world / "out")
    code = cli.main(["--task", str(path), "--template", "first"])
    out = capsys.readouterr().out
    assert code == 2 and "is not writable" in out and "--outputs-dir" in out, out
    assert tree_digest(world / "out") == before


def test_output_names_cannot_escape():
    with pytest.raises(outputs.OutputsError):
        outputs.run_folder(Path("/tmp/x"), "..", "toy-ioi")
    with pytest.raises(outputs.OutputsError):
        outputs.model_folder_name("bad name!")
    assert outputs.model_folder_name("EleutherAI/pythia-70m") == "pythia-70m"
    assert outputs.model_folder_name("..") == Path("..").resolve().name


# ---------------------------------------------------------------- crash safety and exclusion

PUBLISHER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from helpers.schema import outputs
    staging, final = Path(sys.argv[1]), Path(sys.argv[2])
    real_replace = os.replace
    def slow_replace(a, b):  # widen every step so that a kill lands between them
        real_replace(a, b)
        time.sleep(0.05)
    outputs.os.replace = slow_replace
    print(os.getpid(), flush=True)
    outputs.publish(staging, final, "first")
""")


def make_result(folder: Path, version: str, n_files: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"item{i}.json").write_text(json.dumps({"version": version, "i": i}))
    (folder / "first_figures").mkdir(exist_ok=True)
    (folder / "first_figures" / "fig.txt").write_text(version)


def versions(folder: Path) -> set[str]:
    found = {json.loads(p.read_text())["version"] for p in folder.glob("item*.json")}
    figure = folder / "first_figures" / "fig.txt"
    return found | ({figure.read_text()} if figure.exists() else {"<figure missing>"})


@pytest.mark.parametrize("delay", [0.06, 0.13, 0.21, 0.33, 0.47, 0.6])
def test_kill_mid_publish_keeps_the_previous_result(tmp_path, delay):
    final = tmp_path / "out" / "ioi" / "toy-ioi"
    make_result(final, "old")
    staging = tmp_path / "out" / ".staging-ioi-toy-ioi-first-1-x"
    make_result(staging, "new", n_files=8)
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(staging), str(final)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    pid = int(proc.stdout.readline())
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)  # the runner's own PID, at a point somewhere in the publish
    proc.wait()
    outputs.recover(final, "first")  # what the next run of this template does first
    seen = versions(final)
    assert seen in ({"old"}, {"new"}), f"killed after {delay}s: a mixture {seen}"
    if seen == {"old"}:
        assert len(list(final.glob("item*.json"))) == 6
    assert not (final / ".publish-first").exists()
    make_result(tmp_path / "again", "newer", n_files=8)
    outputs.publish(tmp_path / "again", final, "first")  # and the next run succeeds
    assert versions(final) == {"newer"}


def test_concurrent_runs_of_one_task_exclude_each_other(world, capsys):
    path = world / "case.yaml"
    path.write_text(params_text())
    root = world / "out"
    with outputs.run_lock(root, "ioi", "toy-ioi", "first"):
        result = runner.run_template(str(path), "first")
    assert result.status == "bad-input" and "another run of ioi/toy-ioi/first is in progress" in result.message
    assert runner.run_template(str(path), "first").status == "ok"  # the lock is free again
    assert json.loads((root / "ioi" / "toy-ioi" / "first.json").read_text())["task"] == "ioi"
    assert not list(root.glob(".staging-*"))


def test_two_runner_processes_at_once_give_one_complete_result(world):
    path = world / "case.yaml"
    path.write_text(params_text())
    env = {**os.environ}
    cmd = [sys.executable, "-m", "helpers.runner.run", "--task", str(path), "--template", "first", "--force", "--no-report"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    final = world / "out" / "ioi" / "toy-ioi"
    if codes == [0, 2]:  # they overlapped: one ran, the other was told why
        assert any("is in progress" in o for o in outs), outs
    else:  # one finished before the other started: both ran, one after the other
        assert codes == [0, 0], outs
    assert json.loads((final / "first.json").read_text())["task"] == "ioi"
    assert (final / "first_figures" / "a.txt").read_text() == "figure"
    assert not list((world / "out").glob(".staging-*")) and not (final / ".publish-first").exists()


def test_stale_staging_of_a_dead_run_is_removed(world):
    path = world / "case.yaml"
    path.write_text(params_text())
    dead = world / "out" / ".staging-ioi-toy-ioi-first-99999-abc"
    dead.mkdir()
    (dead / "first.json").write_text("{}")
    assert runner.run_template(str(path), "first").status == "ok"
    assert not dead.exists()


def test_tokenizer_without_bos_passes_the_checks(family_dirs):
    """Qwen2-style byte-level BPE with no BOS token: prompts start without one, no TypeError."""
    params = runner.check_inputs("ioi", str(family_dirs("qwen2")), n_prompts=6)
    assert params.n_prompts == 6
