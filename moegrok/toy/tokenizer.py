"""Word-level tokenizer for the toy zoo, saved as a real `PreTrainedTokenizerFast`."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from moegrok.toy.data import SYMBOLS

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def build_tokenizer(p: int) -> PreTrainedTokenizerFast:
    """Vocabulary: 4 specials, the residues 0..p-1, the operator symbols. Encodes with a BOS."""
    words = [PAD, BOS, EOS, UNK, *(str(i) for i in range(p)), *SYMBOLS]
    vocab = {word: i for i, word in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def residue_token_ids(tokenizer: PreTrainedTokenizerFast, p: int) -> list[int]:
    """Token ids of the residues 0..p-1, in order (used by the embedding progress measure)."""
    return tokenizer.convert_tokens_to_ids([str(i) for i in range(p)])
