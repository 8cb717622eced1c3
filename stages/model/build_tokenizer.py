"""Builds ``tokenizer.json``: the character-level tokenizer the project ships.

Run ``python -m stages.model.build_tokenizer`` to regenerate it (deterministic). Ids 0..3 are
``<pad> <bos> <eos> <unk>``; every other token is one printable character. The vocabulary
(95 tokens) fits the tiny model's ``vocab_size`` of 128.
"""

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-*/=()?.,:;!'\"<>#%&_^|[]{}\n"
PATH = Path(__file__).with_name("tokenizer.json")


def build() -> Tokenizer:
    vocab: dict[str, int] = {}
    for t in [*SPECIALS, *CHARS]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok


if __name__ == "__main__":
    build().save(str(PATH))
    print(f"wrote {PATH}")
