"""``make copy``: a template as a notebook of your own, with a task's parameters filled in, outside ``nb_outputs/``.

``python -m helpers.runner.workcopy --task ioi --template minimal_circuit [--model toy-ioi] [--to work]`` writes
``work/<task>/<model>/<template>.ipynb``: the template with papermill's parameters cell set (the task, its params
file, the model, ``output_dir`` = that folder, so running it writes nothing into ``nb_outputs/``, and
``input_dir`` = the ``nb_outputs/`` folder holding the earlier templates' results it reads). It is not executed:
open it in Jupyter and run it. Inputs are checked first (as a run checks them: one line, exit 2). An existing copy is
a researcher's work: it is never overwritten (exit 2, naming it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from helpers.runner.run import BAD_INPUT, check_inputs, template_notebook
from helpers.schema import outputs
from helpers.schema.outputs import outputs_dir, scope_of, templates_dir


def working_copy(task: str, template: str, model: str | None = None, to: Path | str = "work", n_prompts: int | None = None) -> Path:
    """Write the parameterised, unexecuted copy (module docstring) and return its path; raises ``FileExistsError``
    if it exists, and the run's bad-input errors (``helpers.runner.run.BAD_INPUT``) for bad params, model or template."""
    import papermill as pm

    if not (templates_dir() / f"{template}.py").is_file():
        raise FileNotFoundError(f"template {template!r} not found in {templates_dir()}")
    params = check_inputs(task, model, n_prompts)
    owner = outputs.owner(params.task, scope_of(template))
    folder = outputs.run_folder(Path(to).resolve(), owner, params.model)
    dest = folder / f"{template}.ipynb"
    if dest.exists():
        raise FileExistsError(f"{dest} exists (your copy, maybe with your notes): not overwritten; move it or choose --to")
    folder.mkdir(parents=True, exist_ok=True)
    source = template_notebook(template, folder / f".{template}.src.ipynb")
    try:
        parameters = {
            "task": params.task,
            "params_file": str(params.source),
            "model_name": params.model,
            "n_prompts": n_prompts,
            "output_dir": str(folder),
            "input_dir": str(outputs.run_folder(outputs_dir(), owner, params.model)),
        }
        declared = pm.inspect_notebook(str(source))
        pm.execute_notebook(
            str(source),
            str(dest),
            parameters={k: v for k, v in parameters.items() if k in declared},
            prepare_only=True,
            kernel_name="python3",
            progress_bar=False,
        )
    finally:
        source.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="task name (params/<task>.yaml) or params file")
    parser.add_argument("--template", required=True, help="template name (nb_templates/<template>.py)")
    parser.add_argument("--model", default=None, help="model instead of the params file's own")
    parser.add_argument("--to", type=Path, default=Path("work"), help="folder of working copies (default work/)")
    parser.add_argument("--n-prompts", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        dest = working_copy(args.task, args.template, args.model, args.to, args.n_prompts)
    except (*BAD_INPUT, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {dest} (parameters filled in, not executed): open it in Jupyter and run it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
