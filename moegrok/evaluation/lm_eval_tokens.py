"""Text to token ids as lm-eval's HF model (`lm_eval --model hf`) makes them, for any engine."""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, postprocess_generated_text

Tokens = list[int]


class HFTokenization:
    """lm-eval's own `HFLM.tok_encode` and `TemplateLM._encode_pair` (the context's trailing
    spaces move to the continuation; the pair is encoded whole and split at the context's length)
    bound to an engine's tokenizer, with `lm_eval --model hf`'s default options."""

    backend = "causal"
    add_bos_token = None
    custom_prefix_token_id = None
    prefix_token_id = HFLM.prefix_token_id
    tok_encode = HFLM.tok_encode
    _encode_pair = TemplateLM._encode_pair

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def pair(self, context: str, continuation: str, *, max_length: int) -> tuple[Tokens, Tokens]:
        """A loglikelihood request as lm-eval's `loglikelihood` and `_loglikelihood_tokens` see it:
        (context ids, continuation ids), the context cut from the left to fit `max_length` inputs."""
        if context == "":  # the prefix token (BOS, else EOS) stands for an empty context
            continuation_ids = self.tok_encode(continuation, add_special_tokens=False)
            if continuation_ids[0] == self.prefix_token_id:
                context_ids, continuation_ids = continuation_ids[:1], continuation_ids[1:]
            else:
                context_ids = [self.prefix_token_id]
        else:
            context_ids, continuation_ids = self._encode_pair(context, continuation)
        if len(continuation_ids) > max_length:
            raise ValueError(f"a continuation of {len(continuation_ids)} tokens exceeds the model's {max_length}")
        kept = (context_ids + continuation_ids)[-(max_length + 1) :]  # the last token is never an input
        return kept[: len(kept) - len(continuation_ids)], continuation_ids

    def generation_prompt(self, context: str, *, max_gen_toks: int, max_length: int) -> Tokens:
        """A generate_until context as `HFLM.tok_batch_encode` encodes one (BOS unless the text
        starts with it), cut from the left to leave room for `max_gen_toks`."""
        if max_gen_toks >= max_length:
            raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context in {max_length} tokens")
        special = {"add_special_tokens": False} if has_bos_prefix(context, self.tokenizer.bos_token) else {}
        return self.tokenizer(context, **special)["input_ids"][-(max_length - max_gen_toks) :]

    def stop_strings(self, until: tuple[str, ...]) -> tuple[str, ...]:
        """`until` and the EOS text, where lm-eval's HF model stops and cuts a generation."""
        eos = self.tokenizer.decode(self.tokenizer.eos_token_id, skip_special_tokens=False)
        return tuple(handle_stop_sequences(list(until), eos=eos))

    def generated_text(self, tokens: Tokens, stop: tuple[str, ...]) -> str:
        """A generation's text as `HFLM.generate_until` returns it: decoded without special tokens,
        cut before the first stop string."""
        return postprocess_generated_text(self.tokenizer.decode(tokens, skip_special_tokens=True), stop=list(stop),
                                          think_end_token=None)
