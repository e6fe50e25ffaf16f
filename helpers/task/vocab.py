"""Word-level vocabulary and tokenizer of the bundled toy models.

Every word of the shipped pools (``params/pools/*.txt``) and of the training templates is one token, in
two forms: bare (``Mary``, for the start of a sentence) and GPT-2-style space-prefixed (``ĠMary`` for
``" Mary"``). Punctuation splits as in GPT-2 (``"Then,"`` -> ``Then``, ``,``). Unknown text maps to its own
``<unk>`` id (1), never to the BOS id (0), so the prompt generator can detect out-of-vocabulary words.
"""

from __future__ import annotations

import re
from pathlib import Path

from helpers import POOLS_DIR
from helpers.task.params import NAME_RE, ParamsError, read_text_file

BOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
PUNCTUATION = [",", ".", "!", "?", ":", ";", "'s", "-"]


MAX_POOL_BYTES = 5_000_000


def read_pool(name: str) -> list[str]:
    """The words of pool ``name`` (``params/pools/<name>.txt``), one per line, blanks and ``#`` lines skipped.

    Raises ParamsError (naming the file and the fix) for a name that is not a pool name, a missing, binary,
    non-UTF-8 or oversized file, and a pool with no words."""
    if not NAME_RE.fullmatch(name):
        raise ParamsError(f"pool {name!r}: not a pool name (letters, digits, '_' or '-'; the file is params/pools/<name>.txt)")
    path = POOLS_DIR / f"{name}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in POOLS_DIR.glob("*.txt"))
        raise ParamsError(f"{path}: word pool '{name}' not found; available pools: {available}")
    lines = (line.strip() for line in read_text_file(path, "word pool", MAX_POOL_BYTES).splitlines())
    words = [line for line in lines if line and not line.startswith("#")]
    if not words:
        raise ParamsError(f"{path}: word pool '{name}' has no words; add one word per line")
    return words


def words_of(text: str) -> list[str]:
    """Alphanumeric words of ``text`` (template words that need a token), ignoring ``[slot]`` markers."""
    return re.findall(r"[A-Za-z0-9]+", re.sub(r"\[[A-Za-z0-9_]+\]", " ", text))


def build_vocab(extra_words: list[str]) -> dict[str, int]:
    """Token -> id for all pool words plus ``extra_words``, each bare and with the ``Ġ`` space prefix."""
    words: list[str] = []
    for pool in sorted(p.stem for p in POOLS_DIR.glob("*.txt")):
        words.extend(read_pool(pool))
    words.extend(extra_words)
    tokens = [BOS_TOKEN, UNK_TOKEN]
    for word in list(dict.fromkeys(words)) + PUNCTUATION:
        tokens.extend([word, "Ġ" + word])
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build_tokenizer(vocab: dict[str, int]):
    """A ``PreTrainedTokenizerFast`` over ``vocab`` with GPT-2 byte-level pre-tokenisation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        pad_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=128,
    )


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (without the config the bridge silently maps all text to id 0)."""
    tokenizer.save_pretrained(str(out_dir))
    if not (Path(out_dir) / "tokenizer_config.json").exists():
        raise RuntimeError(f"tokenizer_config.json was not written to {out_dir}")
