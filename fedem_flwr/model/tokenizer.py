"""Byte-level multilingual tokenizer: UTF-8 bytes plus four special tokens, built locally.

Every language and script is covered with no download (what FedEm's Seshu wanted from ByT5). The
256 bytes are spelled with the GPT-2 byte-to-unicode alphabet so the standard ``tokenizers``
ByteLevel decoder restores them exactly; optional BPE merges trained on a corpus shorten sequences.
Special tokens are never matched inside text (``split_special_tokens``), so a document that
literally contains ``<eos>`` round-trips as its bytes instead of ending early.

With ``chat`` (the default) four role tokens follow every other token (``<|system|>``, ``<|user|>``,
``<|assistant|>``, ``<|end|>``: ids 260-263 without merges, so every byte keeps its id) and a chat
template renders a conversation as ``<|role|>content<|end|>`` per turn, the assistant's content and
its ``<|end|>`` marked ``{% generation %}`` so ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` says which tokens an ``sft-chat`` adapter learns. The role
tokens are *added*, not special: ``split_special_tokens`` would spell special tokens as bytes even in
the rendered template, whereas added tokens are matched in any text, so the rendered conversation
and a plain transformers pipeline (``tokenizer(rendered)``) give the same ids. The price: a document
that literally contains ``<|user|>`` gets the role token, not its bytes. ``chat=False`` builds the
260-token vocabulary of hubs set up before chat existed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fedem_flwr.data.chat import CHAT_TEMPLATE, ROLE_TOKENS, has_chat_template  # noqa: F401 - re-exported
from fedem_flwr.errors import ConfigError, ModelNotFound

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from fedem_flwr.config.schema import TokenizerConfig

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
BYTE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


# Words keep their leading space; runs of whitespace stay whole. Script-agnostic on purpose: the
# GPT-2 regex splits Indic words at every vowel sign, which wastes merges on Devanagari and Telugu.
_WORD_SPLIT = Regex(r"\s*\S+|\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (ByteLevel's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(_WORD_SPLIT, behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_model() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = len(vocab)  # byte b has id b + 4
    return _pipeline(Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK)))


def _bpe_model(corpus: Iterable[str], bpe_merges: int) -> Tokenizer:
    tokenizer = _pipeline(Tokenizer(models.BPE(unk_token=UNK)))
    trainer = trainers.BpeTrainer(
        vocab_size=BYTE_VOCAB_SIZE + bpe_merges,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def build_byte_tokenizer(
    corpus: Optional[Iterable[str]] = None, bpe_merges: int = 0, model_max_length: int = 4096, chat: bool = True
) -> "PreTrainedTokenizerFast":
    """UTF-8 byte tokenizer (``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, byte b = b + 4).

    ``tokenizer(text)`` wraps the bytes in ``<bos> ... <eos>``; pass ``add_special_tokens=False``
    for the bare bytes. With ``bpe_merges > 0`` up to that many merges are learnt from ``corpus``
    (fewer when the corpus has fewer pairs seen twice). ``chat`` appends the role tokens and sets the
    chat template (module doc).
    """
    from transformers import PreTrainedTokenizerFast

    if bpe_merges < 0:
        raise ConfigError(f"`tokenizer.bpe_merges` is {bpe_merges!r}; it must be >= 0.")
    if bpe_merges and corpus is None:
        raise ConfigError(f"`tokenizer.bpe_merges` is {bpe_merges}, but no corpus was given to learn them from.")
    backend = _bpe_model(corpus, bpe_merges) if bpe_merges else _byte_model()
    ids = [backend.token_to_id(token) for token in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3], ids  # the trainer puts special tokens first, in order
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}", special_tokens=[(BOS, 1), (EOS, 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        split_special_tokens=True,
        model_max_length=model_max_length,
    )
    if chat:
        add_chat_template(tokenizer)
    return tokenizer


def add_chat_template(tokenizer: "PreTrainedTokenizerBase") -> None:
    """Append the role tokens (non-special, so they match in rendered text) and set the chat template."""
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in ROLE_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE


def load_tokenizer(cfg: "TokenizerConfig", corpus: Optional[Iterable[str]] = None) -> "PreTrainedTokenizerBase":
    """The configured tokenizer: built from bytes, or any Hugging Face tokenizer (never remote code)."""
    if cfg.kind == "bytes":
        return build_byte_tokenizer(corpus, cfg.bpe_merges, cfg.model_max_length, chat=cfg.chat)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelNotFound(
            f"`tokenizer.path` {cfg.path!r} is neither a tokenizer folder nor a reachable repo id ({err})."
        ) from err
