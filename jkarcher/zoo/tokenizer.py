"""The zoo's tokenizer: one token per byte (no merges), so digits and brackets stay separate.

Arithmetic and string tasks need every character visible to the model; a byte-level vocabulary
of 256 symbols plus three special tokens does that for any text, and needs no training.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer without merges: ids 0-2 special, then the 256 byte symbols."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer
