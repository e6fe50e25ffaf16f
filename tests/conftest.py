"""Shared fixtures: the bundled models, loaded once per test session, and small prompt batches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from helpers.task.models import load_model
from helpers.task.params import load_params
from helpers.task.prompts import make_prompts

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def toy_ioi():
    return load_model("toy-ioi", device="cpu")


@pytest.fixture(scope="session")
def toy_induction():
    return load_model("toy-induction", device="cpu")


@pytest.fixture(scope="session")
def ioi_prompts(toy_ioi):
    return make_prompts(load_params("ioi", n_prompts=16), toy_ioi.tokenizer, verbose=False)


@pytest.fixture(scope="session")
def random_two_layer(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 with the bundled tokenizer, saved and loaded through the bridge."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from helpers import MODELS_DIR

    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(MODELS_DIR / "toy-ioi")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    out = tmp_path_factory.mktemp("random2l")
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return load_model(str(out), device="cpu")


FAMILY_TOKENIZERS = {"qwen2": "gpt2-no-bos"}  # Qwen ships a byte-level BPE without BOS; the others use the toy vocabulary


def _family_tokenizer(kind: str):
    from transformers import AutoTokenizer

    from helpers import MODELS_DIR

    if kind == "gpt2-no-bos":
        tok = AutoTokenizer.from_pretrained(MODELS_DIR / "tokenizers" / "gpt2")
        tok.bos_token = None
        return tok
    return AutoTokenizer.from_pretrained(MODELS_DIR / "toy-ioi")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Builds (once, lazily) a tiny random-init model of a family, saved as a HF folder; returns its path."""
    from helpers.toys.families import build_family_model

    built: dict = {}

    def build(family: str):
        if family not in built:
            tok = _family_tokenizer(FAMILY_TOKENIZERS.get(family, "toy"))
            built[family] = build_family_model(family, tok, tmp_path_factory.mktemp(family))
        return built[family]

    return build


@pytest.fixture(scope="session")
def family_models(family_dirs):
    """Loads (once) the tiny model of a family through the bridge, with 6 IOI prompts in the model's convention."""
    loaded: dict = {}

    def get(family: str):
        if family not in loaded:
            model = load_model(str(family_dirs(family)), device="cpu")
            prompts = make_prompts(
                load_params("ioi", n_prompts=6), model.tokenizer, verbose=False, prepend_bos=model.cfg.default_prepend_bos
            )
            loaded[family] = (model, prompts)
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def toy_ioi_llama():
    return load_model("toy-ioi-llama", device="cpu")
