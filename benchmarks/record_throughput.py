"""Routing-recorder throughput vs HF baselines, measured in the same run, interleaved.

    python benchmarks/record_throughput.py [--zoo zoo/default] [--samples 2000]
    python benchmarks/record_throughput.py --gpu --samples 600   # OLMoE-1B-7B and Qwen3-30B-A3B shapes, bf16, CUDA
    python benchmarks/record_throughput.py --gpu --device cpu --shapes tiny --samples 40 --max-len 16  # smoke test

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


SHAPES = {  # random-weight models of real shapes (active parameters per token in the last field)
    "olmoe-1b-7b": ("olmoe", dict(hidden_size=2048, num_hidden_layers=16, num_experts=64, num_experts_per_tok=8,
                                  intermediate_size=1024, vocab_size=50304, num_attention_heads=16)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
                                        moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936,
                                        num_attention_heads=32, num_key_value_heads=4, head_dim=128)),
    # a CPU smoke test of this path (--device cpu)
    "tiny": ("olmoe", dict(hidden_size=64, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                           intermediate_size=32, vocab_size=512, num_attention_heads=4)),
}


def active_parameters(model) -> float:
    """Parameters one token passes through: everything but the unrouted experts and the input embedding."""
    from moegrok.routing.families import adapter_for

    adapter = adapter_for(model)
    num_experts, top_k = adapter.num_experts(model.config), adapter.top_k(model.config)
    total = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return total - experts * (1 - top_k / num_experts)


def router_margins(model, samples, *, max_tokens_per_batch: int) -> np.ndarray:
    """Per layer, the share of real tokens whose k-th and (k+1)-th router probabilities are within
    bf16 rounding of each other (2^-8 relative): ties a different kernel may break the other way."""
    k = model.config.num_experts_per_tok
    device = next(model.parameters()).device
    tied, total = 0, 0
    with torch.inference_mode():
        for batch in length_buckets([len(s.input_ids) for s in samples], max_tokens_per_batch=max_tokens_per_batch):
            input_ids, mask = (t.to(device) for t in pad_batch([samples[i] for i in batch]))
            out = model.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False,
                                      output_router_logits=True)
            valid = mask.bool().flatten()
            probs_LNE = torch.stack([F.softmax(logits.float(), -1)[valid] for logits in out.router_logits])
            top_LNK1 = probs_LNE.topk(k + 1, -1).values
            gap_LN = top_LNK1[..., k - 1] - top_LNK1[..., k]
            tied = tied + (gap_LN <= top_LNK1[..., k - 1] * 2**-8).sum(-1).cpu().numpy()
            total += int(valid.sum())
    return tied / total


def agreement(table, reference, num_layers: int, k: int) -> np.ndarray:
    """Per layer, the share of (token, layer) top-k sets equal to the reference's."""
    same, total = np.zeros(num_layers), 0
    for ours, theirs in zip(table["topk_ids"].to_numpy(zero_copy_only=False),
                            reference["topk_ids"].to_numpy(zero_copy_only=False), strict=True):
        a = np.sort(np.asarray(ours).reshape(num_layers, -1, k), -1)
        b = np.sort(np.asarray(theirs).reshape(num_layers, -1, k), -1)
        same += (a == b).all(-1).sum(-1)
        total += a.shape[1]
    return same / max(total, 1)


def gpu_benchmark(args) -> None:
    """Every experts implementation, compiled and not, against the fair grouped_mm baseline and
    its own forward floor (interleaved rounds), with ids agreement vs eager, near-ties, MFU, peak
    memory, compile time and compilations per 10 checkpoints."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from moegrok.routing.fused_moe import set_experts_implementation
    from moegrok.routing.settings import triton_available, vllm_fused_available

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA (or --device cpu --shapes tiny for a smoke test)")
    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    implementations = ["eager", "grouped_mm", "batched_mm"]
    if on_gpu and triton_available():
        implementations.append("fused_triton")
    if on_gpu and vllm_fused_available():
        implementations.append("fused_vllm")
    peak_flops = args.peak_tflops * 1e12
    for shape in args.shapes.split(","):
        family, fields = SHAPES[shape]
        config = CONFIG_MAPPING[family](**fields)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        for routers in ("random", "trained-like"):
            if routers == "trained-like":  # router rows scaled up: margins like a trained router's
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if name.endswith("mlp.gate.weight"):
                            p.mul_(args.router_scale)
            samples = variable_length_samples(config.vocab_size, args.samples, max_len=args.max_len)
            budget = args.max_tokens_per_batch
            tied = router_margins(model, samples, max_tokens_per_batch=budget)
            print(f"== {shape} ({routers} routers, {dtype}): tokens whose k-th and (k+1)-th router scores are "
                  f"within bf16 rounding, per layer: {np.array2string(tied, precision=4)}")
            set_experts_implementation(model, "eager", device)
            reference = RoutingRecorder(model, max_tokens_per_batch=budget).record(samples, checkpoint="c", step=0)
            active = active_parameters(model)
            for impl in implementations:
                for compiled in (False, True):
                    line = measure_setting(model, samples, reference, impl=impl, compiled=compiled, budget=budget,
                                           device=device, repeats=args.repeats)
                    tok_s = line.pop("tok_s")
                    print(f"[{shape} {routers} experts={impl} compiled={compiled}] recorder {tok_s:,.0f} tok/s "
                          f"(MFU {tok_s * 2 * active / peak_flops:.1%}) | " + " | ".join(line.values()))
            set_experts_implementation(model, "eager", device)
        del model
        if on_gpu:
            torch.cuda.empty_cache()


def measure_setting(model, samples, reference, *, impl: str, compiled: bool, budget: int, device: str,
                    repeats: int) -> dict:
    """One row of the GPU table: the recorder with `impl` experts (compiled or not) against the fair
    grouped_mm baseline and its own forward floor, interleaved."""
    from torch._dynamo.utils import counters

    from moegrok.routing.compiled import compiled_recorder, padded_shape
    from moegrok.routing.fused_moe import set_experts_implementation

    on_gpu = device.startswith("cuda")
    torch._dynamo.reset()
    counters.clear()
    set_experts_implementation(model, impl, device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if compiled:  # the floor: the same compiled decoder (its hooks fire, nothing is checked, copied or scored)
        recorder = compiled_recorder(model, max_tokens_per_batch=budget)

        def floor_decoder(**inputs):
            recorder._captured.clear()  # what other runs' forwards left there (the graph guards on its length)
            out = recorder.decoder(**inputs)
            recorder._captured.clear()
            return out
    else:
        recorder = RoutingRecorder(model, max_tokens_per_batch=budget)
        floor_decoder = model.get_decoder()
    table = recorder.record(samples, checkpoint="c", step=0)  # the first call compiles
    first_s = time.perf_counter() - start
    pad = padded_shape if compiled else None
    runs = {"recorder": lambda: recorder.record(samples, checkpoint="c", step=0),
            "fair": lambda: (grouped_mm_fair(model, samples, budget), recorder._captured.clear()),
            "forward": lambda: forward_floor(floor_decoder, samples, max_tokens_per_batch=budget, pad_to=pad,
                                             device=model.device)}
    runs["forward"]()  # compiles the floor's graphs
    seconds = interleaved(runs, repeats=repeats)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(10):  # 10 checkpoints: weights overwritten in place, as the record actor does
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0)
        recorder.record(samples, checkpoint="c", step=0)
    more = counters["stats"]["unique_graphs"] - graphs
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    num_tokens = sum(len(s.input_ids) for s in samples)
    steady_s = min(seconds["recorder"])
    ratios = {name: float(np.median(np.array(t) / np.array(seconds["recorder"]))) for name, t in seconds.items()}
    k = model.config.num_experts_per_tok
    agree = agreement(table, reference, model.config.num_hidden_layers, k)
    recorder.close()
    return {"tok_s": num_tokens / steady_s,
            "fair": f"fair HF grouped_mm {num_tokens / min(seconds['fair']):,.0f} tok/s -> {ratios['fair']:.2f}x",
            "floor": f"forward floor {num_tokens / min(seconds['forward']):,.0f} tok/s (recorder at "
                     f"{1 / ratios['forward']:.0%})",
            "ids": f"ids = eager's: min {agree.min():.2%}, mean {agree.mean():.2%} (per layer "
                   f"{np.array2string(agree, precision=4)})",
            "memory": f"peak {peak:.1f} GiB",
            "compile": f"first call {first_s:.1f} s (compile ~{max(first_s - steady_s, 0):.1f} s), graphs "
                       f"compiled {graphs}, {more} more over 10 checkpoints"}


def forward_floor(decoder, samples, *, max_tokens_per_batch: int, device, pad_to=None) -> None:
    """The decoder alone (same experts implementation and compilation) over the recorder's buckets."""
    with torch.inference_mode():
        for batch in length_buckets([len(s.input_ids) for s in samples], max_tokens_per_batch=max_tokens_per_batch):
            input_ids, mask = pad_batch([samples[i] for i in batch])
            if pad_to is not None:
                rows, cols = pad_to(*input_ids.shape)
                grow = (0, cols - input_ids.shape[1], 0, rows - input_ids.shape[0])
                input_ids, mask = F.pad(input_ids, grow), F.pad(mask, grow)
            decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()


def grouped_mm_fair(model, samples, budget: int):
    """The fair HF baseline with transformers' grouped_mm experts, uncompiled (the implementation is
    switched for the call and restored)."""
    current = model.config._experts_implementation
    model.set_experts_implementation("grouped_mm")
    try:
        return fair_baseline(model, samples, max_tokens_per_batch=budget)
    finally:
        model.set_experts_implementation(current)


def interleaved(runs: dict, *, repeats: int) -> dict[str, list[float]]:
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    return seconds


if __name__ == "__main__":
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo/default"))
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="the GPU table (every experts implementation, compiled "
                        "and not) for random-weight models of real shapes")
    parser.add_argument("--device", default="cuda", help="--gpu: cuda, or cpu for a smoke test with --shapes tiny")
    parser.add_argument("--shapes", default="olmoe-1b-7b,qwen3-30b-a3b", help=f"--gpu: of {', '.join(SHAPES)}")
    parser.add_argument("--max-len", type=int, default=1024, help="--gpu: samples of 4..max-len tokens")
    parser.add_argument("--max-tokens-per-batch", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--router-scale", type=float, default=8.0, help="trained-like routers: rows scaled by this")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator (H100/H200 bf16 dense)")
    args = parser.parse_args()
    gpu_benchmark(args) if args.gpu else cpu_toy(args)
