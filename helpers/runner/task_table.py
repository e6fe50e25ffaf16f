"""Which shipped tasks a model can do: every ``params/*.yaml`` on one model, refused or measured.

A task is *refused* when its prompts cannot be written in the model's tokenizer (e.g. an answer that is two
tokens: SmolLM2 writes " 5" as " " and "5"), with the exact reason ``check_inputs`` gives before any run; otherwise
its clean and corrupted logit differences and accuracy are measured on the task's prompts (the task check every
template starts with). ``python -m helpers.task.real_models --tasks`` writes the table into a real model's card;
``python -m helpers.runner.task_table MODEL`` prints it for any model.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from helpers import PARAMS_DIR


@dataclass
class TaskRow:
    """One task on one model: refused (with the reason) or measured."""

    task: str
    params_file: str
    refused: str = ""
    n_prompts: int = 0
    accuracy: float = float("nan")
    top1: float = float("nan")
    clean_logit_diff: float = float("nan")
    corrupted_logit_diff: float = float("nan")
    task_performed: bool = False

    def line(self) -> str:
        if self.refused:
            return f"{self.task:<12} refused: {self.refused}"
        verdict = "performed" if self.task_performed else "NOT performed"
        return (
            f"{self.task:<12} {verdict:<13} accuracy {self.accuracy:.2f} top-1 {self.top1:.2f} "
            f"logit diff {self.clean_logit_diff:.2f} (corrupted {self.corrupted_logit_diff:.2f}), {self.n_prompts} prompts"
        )


def measure_tasks(model_name: str, params_dir: Path | None = None, threads: int | None = None, write_card: bool = True) -> list[TaskRow]:
    """Every params file of ``params_dir`` on ``model_name`` (see the module docstring); for a real model, the rows
    are also written into its model card."""
    from helpers.notebook.session import task_check_of
    from helpers.runner.run import check_inputs
    from helpers.task.models import load_model, set_threads
    from helpers.task.params import ParamsError
    from helpers.task.prompts import make_prompts

    set_threads(threads)
    rows, runnable = [], []
    for path in sorted((params_dir or PARAMS_DIR).glob("*.yaml")):
        try:
            params = check_inputs(str(path), model_name)
        except ParamsError as err:
            rows.append(TaskRow(path.stem, path.name, refused=str(err).split(": ", 1)[-1]))
            continue
        runnable.append((path, params))
    model = load_model(model_name) if runnable else None
    for path, params in runnable:
        prompts = make_prompts(params, model.tokenizer, verbose=False, prepend_bos=model.cfg.default_prepend_bos).to(model.cfg.device)
        check = task_check_of(model, prompts, params)
        rows.append(
            TaskRow(
                params.task,
                path.name,
                n_prompts=len(prompts.clean_prompts),
                accuracy=check.accuracy,
                top1=check.top1,
                clean_logit_diff=check.clean_logit_diff,
                corrupted_logit_diff=check.corrupted_logit_diff,
                task_performed=check.performed,
            )
        )
    rows.sort(key=lambda r: r.params_file)
    from helpers.task.real_models import REAL_MODELS, folder_of, read_card
    from helpers.task.real_models import write_card as write_model_card

    if write_card and model_name in REAL_MODELS and (card := read_card(model_name)) is not None:
        card["tasks"] = {Path(r.params_file).stem: {"task": r.task, "refused": r.refused} if r.refused else asdict(r) for r in rows}
        write_model_card(folder_of(model_name), card)
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers.runner.task_table", description="every shipped task on one model")
    parser.add_argument("model")
    parser.add_argument("--params-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    for row in measure_tasks(args.model, args.params_dir, args.threads):
        print(row.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
