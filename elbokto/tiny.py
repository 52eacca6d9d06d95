"""A tiny tokenizer trained offline on a few texts, for tests and the demo (nothing downloaded)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, MASK = "<|pad|>", "<|endoftext|>", "<|mask|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD, EOS, MASK, *ROLE_TOKENS)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Byte-level BPE starts from all 256 byte symbols, so any text tokenises (no unknown token) and
# decoding is exact.
_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``, with pad / eos / mask tokens and a chat template.

    Special tokens take ids 0.. in the order of ``SPECIAL_TOKENS`` (pad 0, eos 1, mask 2), and the
    role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>`` are single tokens,
    so :data:`CHAT_TEMPLATE` renders a turn as ``<|role|>content<|end|>``. Training is
    deterministic: the same texts give the same vocabulary.

    Args:
        texts: training corpus, a few sentences suffice.
        vocab_size: upper bound on ``len(tokenizer)``; merges stop early when the texts run out
            of pairs. At least 256 bytes + the special tokens.
    """
    floor = len(_ALPHABET) + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size} is below the {floor} tokens of the byte "
            f"alphabet and the special tokens"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        mask_token=MASK,
        extra_special_tokens=list(ROLE_TOKENS),
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
