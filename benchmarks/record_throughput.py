"""Routing-recorder throughput vs HF baselines, measured in the same run, interleaved.

    python benchmarks/record_throughput.py [--zoo zoo/default] [--samples 2000]
    python benchmarks/record_throughput.py --gpu     # OLMoE-1B-7B-shaped random bf16 model on CUDA

moegrok: RoutingRecorder (router hooks, length-bucketed batches, logits only at scored
positions, chunked, one device sync per batch).
Fair HF baseline (the ratio that counts): the same work through the public API, like with like:
the decoder with `output_router_logits=True` (no auxiliary loss, no KV cache), the recorder's
length buckets, softmax + top-k of every layer's router logits, logits only at the scored
positions, one sync per batch.
Naive HF baseline (for reference): `model(..., output_router_logits=True)` on padded batches in
input order (auxiliary loss computed, KV cache on), full logits, a sync per sample.
All three produce the same ids and losses; the script checks that. The bare decoder forward over
the same buckets (no hooks, no loss) is printed as the floor none can beat.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from moegrok.data.batching import length_buckets, pad_batch
from moegrok.data.samples import TokenizedSample
from moegrok.routing.recorder import RoutingRecorder


def naive_baseline(model, samples, *, batch_size: int):
    """Plain HF: padded batches in input order, full logits, router logits for every layer."""
    k = model.config.num_experts_per_tok
    device = next(model.parameters()).device
    losses, ids = [], []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            input_ids, mask = pad_batch(batch)
            width = input_ids.shape[1]
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_router_logits=True)
            topk = [F.softmax(layer.float(), -1).topk(k, -1).indices.view(len(batch), width, k)
                    for layer in out.router_logits]
            logprobs = F.log_softmax(out.logits.float(), -1)
            for b, s in enumerate(batch):
                n = len(s.input_ids)
                targets = input_ids[b, s.num_prompt_tokens : n].to(device)
                positions = torch.arange(s.num_prompt_tokens - 1, n - 1, device=device)
                losses.append(float(-logprobs[b, positions, targets].mean()))
                ids.append(torch.stack([t[b, :n] for t in topk]).cpu())
    return losses, ids


def fair_baseline(model, samples, *, max_tokens_per_batch: int):
    """The recorder's work through the public API: decoder router logits, same buckets, scored
    positions only, one sync per batch. Returns losses and ids in input order."""
    k = model.config.num_experts_per_tok
    device = next(model.parameters()).device
    losses, ids = [0.0] * len(samples), [None] * len(samples)
    with torch.inference_mode():
        for batch in length_buckets([len(s.input_ids) for s in samples], max_tokens_per_batch=max_tokens_per_batch):
            members = [samples[i] for i in batch]
            input_ids_BT, mask_BT = (t.to(device) for t in pad_batch(members))
            out = model.get_decoder()(input_ids=input_ids_BT, attention_mask=mask_BT, use_cache=False,
                                      output_router_logits=True)
            width = input_ids_BT.shape[1]
            ids_BLTK = torch.stack([F.softmax(logits.float(), -1).topk(k, -1).indices.view(len(batch), width, k)
                                    for logits in out.router_logits], 1)
            rows = torch.cat([torch.full((len(s.input_ids) - s.num_prompt_tokens,), b)
                              for b, s in enumerate(members)]).to(device)
            cols = torch.cat([torch.arange(s.num_prompt_tokens - 1, len(s.input_ids) - 1) for s in members]).to(device)
            logits_NV = model.get_output_embeddings()(out.last_hidden_state[rows, cols]).float()
            nll_N = F.cross_entropy(logits_NV, input_ids_BT[rows, cols + 1], reduction="none")
            loss_B = torch.zeros(len(batch), device=device).index_add_(0, rows, nll_N)
            loss_B /= torch.bincount(rows, minlength=len(batch))
            loss_B, ids_BLTK = loss_B.cpu(), ids_BLTK.cpu()  # the one sync of this batch
            for b, i in enumerate(batch):
                losses[i], ids[i] = float(loss_B[b]), ids_BLTK[b, :, : len(samples[i].input_ids)]
    return losses, ids


def variable_length_samples(tokenizer_size: int, num: int, *, max_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [TokenizedSample(f"s{i}", "g", np.concatenate([[1], rng.integers(4, tokenizer_size, int(n) - 1)]), 1)
            for i, n in enumerate(rng.integers(4, max_len + 1, size=num))]


def forward_only(model, samples, *, max_tokens_per_batch: int) -> None:
    """The decoder alone over the recorder's length buckets: no hooks, no loss (a lower bound)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in length_buckets([len(s.input_ids) for s in samples], max_tokens_per_batch=max_tokens_per_batch):
            input_ids, mask = pad_batch([samples[i] for i in batch])
            model.get_decoder()(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)


def measure(model, samples, *, batch_size: int, max_tokens_per_batch: int, repeats: int = 5):
    """Best tok/s of each run over `repeats` interleaved rounds, and the median per-round ratios
    of the recorder's speed to each other run (robust to a machine whose speed drifts)."""
    num_tokens = sum(len(s.input_ids) for s in samples)
    recorder = RoutingRecorder(model, max_tokens_per_batch=max_tokens_per_batch)
    runs = {"recorder": lambda: recorder.record(samples, checkpoint="c", step=0),
            "fair": lambda: fair_baseline(model, samples, max_tokens_per_batch=max_tokens_per_batch),
            "naive": lambda: naive_baseline(model, samples, batch_size=batch_size),
            "forward": lambda: forward_only(model, samples, max_tokens_per_batch=max_tokens_per_batch)}
    for name in ("recorder", "fair", "naive"):  # warm-up
        runs[name]()
    seconds = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - start)
    ours = results["recorder"]
    k = model.config.num_experts_per_tok
    for name in ("fair", "naive"):
        np.testing.assert_allclose(ours["loss"].to_numpy(), results[name][0], rtol=2e-3, atol=2e-3)
        for row, ids_LTK in zip(ours["topk_ids"].to_pylist(), results[name][1], strict=True):
            got = np.sort(np.array(row).reshape(ids_LTK.shape[0], -1, k), axis=-1)  # as sets: ties may swap
            np.testing.assert_array_equal(got, np.sort(ids_LTK.numpy(), axis=-1))
    recorder_s = np.array(seconds["recorder"])
    return ({name: num_tokens / min(times) for name, times in seconds.items()},
            {name: float(np.median(np.array(seconds[name]) / recorder_s)) for name in runs})


def cpu_toy(args) -> None:
    from transformers import AutoModelForCausalLM

    from moegrok.data.samples import read_samples, tokenize_samples

    steps = sorted(int(p.name[4:]) for p in args.zoo.glob("step*"))
    path = args.zoo / f"step{steps[-1]}"
    torch.set_num_threads(args.threads)
    zoo_samples = read_samples(args.zoo / "samples.jsonl").head(args.samples)
    settings = (("HF defaults (sdpa)", "sdpa", None), ("toy settings (eager attn, grouped_mm)", "eager", "grouped_mm"))
    for label, attn, experts in settings:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
        if experts:
            model.set_experts_implementation(experts)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        sets = {"toy samples (5-9 tokens)": tokenize_samples(zoo_samples, tokenizer, max_tokens=32),
                "variable length 4-32 tokens": variable_length_samples(len(tokenizer), args.samples, max_len=32)}
        for name, samples in sets.items():
            tok_s, ratio = measure(model, samples, batch_size=args.batch_size,
                                   max_tokens_per_batch=args.batch_size * 32)
            print(f"[{label}] {name}: recorder {tok_s['recorder']:9,.0f} tok/s | fair HF {tok_s['fair']:9,.0f} tok/s"
                  f" -> {ratio['fair']:.2f}x | naive HF {tok_s['naive']:9,.0f} tok/s -> {ratio['naive']:.2f}x"
                  f" | bare forward {tok_s['forward']:9,.0f} tok/s (recorder at {ratio['forward']:.0%})")


def gpu_olmoe(args) -> None:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    config = OlmoeConfig(hidden_size=2048, num_hidden_layers=16, num_experts=64, num_experts_per_tok=8,
                         intermediate_size=1024, vocab_size=50304, num_attention_heads=16)
    with torch.device("cuda"):
        model = OlmoeForCausalLM(config).to(torch.bfloat16).eval()
    samples = variable_length_samples(50304, args.samples, max_len=1024)
    active_params = 1.3e9
    for impl in ("eager", "grouped_mm"):
        model.set_experts_implementation(impl)
        torch.cuda.reset_peak_memory_stats()
        tok_s, ratio = measure(model, samples, batch_size=16, max_tokens_per_batch=65536, repeats=2)
        peak = torch.cuda.max_memory_allocated() / 2**30
        mfu = tok_s["recorder"] * 2 * active_params / 989e12
        print(f"[experts={impl}] recorder {tok_s['recorder']:,.0f} tok/s (MFU {mfu:.1%}) | fair HF "
              f"{tok_s['fair']:,.0f} tok/s -> {ratio['fair']:.2f}x | naive HF {tok_s['naive']:,.0f} tok/s -> "
              f"{ratio['naive']:.2f}x | bare forward {tok_s['forward']:,.0f} tok/s (recorder at {ratio['forward']:.0%})"
              f"  peak {peak:.1f} GiB")


if __name__ == "__main__":
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo/default"))
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    gpu_olmoe(args) if args.gpu else cpu_toy(args)
