"""Load a model through the TransformerLens 4 bridge, the one code path for bundled toys and gpt2-small.

``load_model(name)`` resolves, in order: a bundled model (``models/<name>/``), a real pretrained model by name
(``smollm2-135m``, ``gemma3-270m``: prepared offline from registry packages on first use, ``helpers.task.real_models``;
the original hub weights when the hub is reachable), an existing local HF directory, then a hub name (with aliases
such as ``gpt2-small`` -> ``gpt2``). It boots with
``TransformerBridge.boot_transformers`` and calls ``enable_compatibility_mode()``, which DLA and the logit
lens need (without it resid values and logits differ from HookedTransformer's). Hub names that are not in
the local cache fail within seconds when the hub cannot be reached, naming the bundled models.

Nothing is imported from torch, transformers or TransformerLens until a function needs it: the batch runner
resolves model names through this module for every run it plans.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from helpers import MODELS_DIR
from helpers.task.real_models import REAL_MODELS, is_prepared

HUB_ALIASES: dict[str, str] = {
    "gpt2-small": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
}
HUB_HOST = "huggingface.co"
BUNDLED_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # models/<name>: a plain folder name, never a path
# Tokenizers shipped in models/tokenizers/ (so params can be checked against real models offline): hub id -> folder.
SHIPPED_TOKENIZERS: dict[str, str] = {hub: "gpt2" for hub in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


class ModelNotAvailable(RuntimeError):
    """The named model cannot be loaded here (unknown, or a hub model while offline)."""


def bundled_models() -> list[str]:
    """Names of the models shipped in ``models/`` (folders with a config.json); real models: ``REAL_MODELS``."""
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/config.json"))


def pick_device(device: str | None = None) -> str:
    """``device`` if given, else CUDA when present, else CPU."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n_threads: int | None) -> None:
    """Limit torch CPU threads (match processes × threads to the cores; oversubscription is 10-20× slower)."""
    if n_threads:
        import torch

        torch.set_num_threads(n_threads)


def resolve_model(name: str) -> str:
    """The local directory or hub id that ``name`` refers to; raises ModelNotAvailable when it cannot load here."""
    bundled = MODELS_DIR / name
    if BUNDLED_NAME_RE.fullmatch(name) and (bundled / "config.json").exists():
        check_model_folder(bundled)
        return str(bundled)
    if name in REAL_MODELS:
        return resolve_real_model(name)
    if Path(name).is_dir():
        check_model_folder(Path(name))
        return str(Path(name))
    hub_id = HUB_ALIASES.get(name, name)
    if not _hub_cached(hub_id) and not _hub_reachable():
        raise ModelNotAvailable(
            f"model '{name}' (hub id '{hub_id}') is not available offline: it is not in the local Hugging Face cache "
            f"and {HUB_HOST} cannot be reached. Bundled models: {bundled_models()}, real models (prepared offline): {sorted(REAL_MODELS)} (or pass a local HF directory)."
        )
    return hub_id


def weights_source(name: str) -> str:
    """ "gguf" (the dequantised registry file) or "hub" (the original weights), see the module docstring."""
    forced = os.environ.get("CIRCUIT_LAB_REAL_WEIGHTS", "").strip().lower()
    if forced in ("gguf", "hub"):
        return forced
    if forced:
        raise ModelNotAvailable(f"CIRCUIT_LAB_REAL_WEIGHTS={forced!r}: use 'gguf' or 'hub' (or leave it unset)")
    hub_id = REAL_MODELS[name].hub_id
    return "hub" if _hub_cached(hub_id) or (not is_prepared(name) and _hub_reachable()) else "gguf"


def describe_weights(name: str) -> str:
    """One line saying which weights of a real model run (for the notebook and the results), or '' for others."""
    if name not in REAL_MODELS:
        return ""
    spec = REAL_MODELS[name]
    if weights_source(name) == "hub":
        return f"{spec.title}: the original weights from the hub ({spec.hub_id})"
    return (
        f"{spec.title}: {spec.quantisation} from the registry package(s) {', '.join(spec.requirements)} "
        f"(sha256 {spec.sha256[:12]}…; not the original bf16 checkpoint {spec.hub_id}: quantisation error included)"
    )


def resolve_real_model(name: str) -> str:
    """The hub id of a real model (online) or its prepared cache folder, preparing it on first use."""
    from helpers.task.real_models import RealModelError, prepare

    try:
        if weights_source(name) == "hub":
            hub_id = REAL_MODELS[name].hub_id
            if not _hub_cached(hub_id) and not _hub_reachable():
                raise ModelNotAvailable(
                    f"real model '{name}': CIRCUIT_LAB_REAL_WEIGHTS=hub asks for the original weights ({hub_id}), but they are "
                    f"not in the local Hugging Face cache and {HUB_HOST} cannot be reached; unset it to use the registry's GGUF weights"
                )
            return hub_id
        return str(prepare(name))
    except RealModelError as err:
        raise ModelNotAvailable(f"real model '{name}': {err}") from None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
# Shapes of the GPT-2 hub models (so params referring to layers and heads are checked offline): hub id -> (layers, heads).
HUB_SHAPES: dict[str, tuple[int, int]] = {"gpt2": (12, 12), "gpt2-medium": (24, 16), "gpt2-large": (36, 20), "gpt2-xl": (48, 25)}


def check_model_folder(folder: Path) -> None:
    """A local model folder has a config, weights and a tokenizer; ModelNotAvailable names what is missing."""
    missing = [
        what
        for what, names in (
            ("config.json", ("config.json",)),
            ("weights (" + " or ".join(WEIGHT_FILES[::2]) + ")", WEIGHT_FILES),
            ("a tokenizer (tokenizer.json)", TOKENIZER_FILES),
            ("tokenizer_config.json", ("tokenizer_config.json",)),
        )
        if not any((folder / n).is_file() for n in names)
    ]
    if missing:
        raise ModelNotAvailable(
            f"model folder {folder} lacks {', '.join(missing)}; a model folder is what "
            "save_pretrained writes for the model and its tokenizer"
        )


def model_shape(name: str) -> tuple[int, int]:
    """(layers, heads per layer) of model ``name`` from its config, without loading weights."""
    if HUB_ALIASES.get(name, name) in HUB_SHAPES and not Path(name).is_dir():
        return HUB_SHAPES[HUB_ALIASES.get(name, name)]
    source = resolve_model(name)
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(source)
        return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise ModelNotAvailable(f"{source}: cannot read the model's config ({' '.join(str(err).split())[:300]})") from None


def load_tokenizer(name: str):
    """The tokenizer of model ``name`` without loading its weights: a bundled or local folder's own, GPT-2's
    shipped copy for GPT-2 hub names (offline), else the hub's (needs the hub or its cache)."""
    from transformers import AutoTokenizer

    bundled = MODELS_DIR / name
    if (BUNDLED_NAME_RE.fullmatch(name) and (bundled / "config.json").exists()) or Path(name).is_dir() or name in REAL_MODELS:
        return AutoTokenizer.from_pretrained(resolve_model(name))
    hub_id = HUB_ALIASES.get(name, name)
    if hub_id in SHIPPED_TOKENIZERS:
        return AutoTokenizer.from_pretrained(MODELS_DIR / "tokenizers" / SHIPPED_TOKENIZERS[hub_id])
    return AutoTokenizer.from_pretrained(resolve_model(name))


def _hub_cached(hub_id: str) -> bool:
    """Whether the hub model's config is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except (ImportError, OSError, ValueError):  # no hub client, an unreadable cache, or not a hub id: not cached
        return False


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP check of the hub (so that an offline machine fails in seconds, not after ~25 s of retries)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes


def enable_compatibility(model) -> str:
    """``model.enable_compatibility_mode()`` with TransformerLens's default weight processing (fold the norms, centre
    the writing weights, centre the unembedding, fold the value biases), bit for bit, at a lower peak memory where
    that is safe. Returns "default" or "lean", the path taken.

    Why: TransformerLens 4.3 runs each processing step on a fresh clone of the whole state dict while the previous
    one and the live parameters are still held, so loading peaks at about three copies of the model plus
    vocabulary-sized temporaries (Gemma-3-270M, whose embedding and unembedding are 640 MiB each: 6.3 GiB, for a
    model that then holds 2.4). The lean path asks TransformerLens for its processing without the two steps that
    need such a copy, then does them on only the tensors they read:
    - **centring the unembedding**: TransformerLens's own ``center_unembed`` on a state dict of the unembedding's
      weight and bias, written back in place (skipped, as TransformerLens skips it, where logits are soft-capped);
    - **folding value biases**: skipped, because it is a no-op: taken only where the model has no value bias under
      any of the keys ``fold_value_biases`` looks up.
    It is taken for float32 models with RMS norms (no writing-weight centring, which would follow the fold);
    everything else takes the default path. An unembedding that still shared storage with another weight after
    processing would be an error, not an in-place centring. The tests compare both paths' processed weights on
    every family (equal, to the bit)."""
    import torch
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.weight_processing import ProcessWeights

    cfg, adapter = model.cfg, model.adapter

    def key(name: str) -> str:
        return ProcessWeights._get_param_key(name, adapter)

    raw = model.state_dict()  # references to the live parameters, no copy
    value_bias_keys = {
        k
        for layer in range(cfg.n_layers)
        for k in (f"blocks.{layer}.attn.v.bias", key(f"blocks.{layer}.attn.b_V"), key(f"blocks.{layer}.attn._b_V"))
    }
    w_u, b_u = key("unembed.W_U"), key("unembed.b_U")
    lean = (
        getattr(cfg, "normalization_type", None) in ("RMS", "RMSPre")
        and w_u in raw
        and all(v.dtype == torch.float32 for v in raw.values() if v.is_floating_point())
        and not value_bias_keys & raw.keys()
    )
    if not lean:
        model.enable_compatibility_mode()
        return "default"
    model.enable_compatibility_mode(center_unembed=False, fold_value_biases=False)
    if softcap_enabled(getattr(cfg, "output_logits_soft_cap", None)):
        return "lean"  # TransformerLens does not centre soft-capped logits either
    processed = model.state_dict()
    unembed = {k: processed[k] for k in (w_u, b_u) if k in processed}
    shared = {processed[k].untyped_storage().data_ptr() for k in processed if k not in unembed}
    if any(v.untyped_storage().data_ptr() in shared for v in unembed.values()):
        raise RuntimeError(
            f"{type(model.original_model).__name__}: the unembedding shares storage after processing; centring it in place would change another weight"
        )
    centred = ProcessWeights.center_unembed(unembed, cfg=cfg, adapter=adapter)
    with torch.no_grad():
        for k, v in unembed.items():
            v.copy_(centred[k])
    return "lean"


def fold_final_norm(model) -> bool:
    """Fold the final norm's weight into the unembedding where TransformerLens left it unfolded (its OLMo-2 adapter
    folds no norm, the final one included), as its ``fold_ln`` does elsewhere: ``W_U <- diag(w) W_U``, ``w <- 1``. DLA,
    the logit lens and neuron DLA read ``W_U`` after the final norm's centring and scaling only, so an unfolded weight
    makes every contribution wrong (measured on a random OLMo-2: identity error 1.0 on logit differences of 2).
    Taken only for a norm that multiplies its output by ``weight`` (checked: not Gemma's ``1 + weight``), without a
    bias, before a linear unembedding; the model's logits on two short probes must be unchanged (else undone).
    Returns whether it folded."""
    import torch

    norm = getattr(getattr(model, "ln_final", None), "_original_component", None)
    unembed = getattr(getattr(model, "unembed", None), "_original_component", None)
    weight = getattr(norm, "weight", None)
    if not isinstance(unembed, torch.nn.Linear) or not isinstance(weight, torch.Tensor) or getattr(norm, "bias", None) is not None:
        return False
    if weight.shape != (unembed.in_features,) or torch.equal(weight, torch.ones_like(weight)):
        return False
    with torch.no_grad():
        saved, x = weight.detach().clone(), torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
        weighted = norm(x)
        weight.fill_(1.0)
        plain = norm(x)
        weight.copy_(saved)
        if not torch.allclose(weighted, plain * saved, atol=1e-6, rtol=1e-5):
            return False
        probe = torch.tensor([[1, 5, 9, 14, 3], [2, 6, 8, 10, 12]], device=weight.device) % model.cfg.d_vocab
        before = model(probe)[:, -1]
        old_unembed = unembed.weight
        unembed.weight = torch.nn.Parameter(
            old_unembed.detach() * saved[None], requires_grad=old_unembed.requires_grad
        )  # a new tensor: never a tied embedding's
        weight.fill_(1.0)
        after = model(probe)[:, -1]
        if not torch.allclose(after - after.mean(-1, keepdim=True), before - before.mean(-1, keepdim=True), atol=1e-4, rtol=1e-4):
            unembed.weight = old_unembed
            weight.copy_(saved)
            return False
    return True


def load_model(name: str, device: str | None = None, dtype: str = "float32", n_devices: int | None = None):
    """A ``TransformerBridge`` for ``name`` in compatibility mode and eval mode, on ``device`` (auto by default).

    ``dtype``: "float32" (default; what every identity test uses), "bfloat16" or "float16" (half the memory:
    weights take 2 bytes per parameter instead of 4; patching effects then agree with float32 only to about
    1e-2, and DLA identities to the same order: use float32 for numbers you report as exact).
    ``n_devices``: split the model over this many GPUs through the bridge's ``n_devices`` (accelerate's dispatch);
    rule of thumb: parameters x bytes per dtype x ~1.5 for activations and caches must fit in their memory.
    """
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    source = resolve_model(name)
    if os.environ.get("CIRCUIT_LAB_PROGRESS") == "0":  # headless batch runs: no weight-loading bars in saved notebooks
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    placement = {"n_devices": n_devices} if n_devices and n_devices > 1 else {"device": pick_device(device)}
    model = TransformerBridge.boot_transformers(source, dtype=getattr(torch, dtype), **placement)
    enable_compatibility(model)
    fold_final_norm(model)
    model.eval()
    tok = model.tokenizer
    # Without tokenizer_config.json the bridge silently loads a tokenizer that maps all text to id 0 (TransformerLens 4.x; measured).
    if tok is None or len(set(tok(" the and to", add_special_tokens=False)["input_ids"])) == 1:
        raise ModelNotAvailable(f"{source}: the tokenizer maps different words to one id; is tokenizer_config.json missing?")
    return model
