"""Every MoE causal-LM family of the installed transformers: recorded, or refused and why.

    python -m benchmarks.moe_families [--samples 16]   # from the repository root: it imports tests/

For each family a tiny random model (tests/reference/models.py) is saved, loaded as a sweep loads it
(moegrok.data.checkpoints.load_checkpoint, default settings) and recorded with RoutingRecorder; each
sample's stored ids and weights (int16 / float16, as in the routing table) are compared with the
slow reference in tests/reference/routing.py (weights differ by float16 rounding at most: the
table stores float16). A refused family shows the recorder's error.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moegrok.config import ModelConfig
from moegrok.data.checkpoints import CheckpointRef, load_checkpoint
from moegrok.data.samples import TokenizedSample
from moegrok.metrics.pathways import routing_shape
from moegrok.routing.families import ADAPTERS, REFUSED
from moegrok.routing.recorder import RoutingRecorder
from tests.reference.models import LOADED_AS_TEXT, TINY_REFUSED, moe_causal_lm_types, save_tiny_moe
from tests.reference.routing import reference_routing


def random_samples(tokenizer, num: int, *, seed: int = 0) -> list[TokenizedSample]:
    rng = np.random.default_rng(seed)
    return [TokenizedSample(f"s{i}", "g", np.concatenate([[tokenizer.bos_token_id],
                                                          rng.integers(4, len(tokenizer), int(n) - 1)]), 1)
            for i, n in enumerate(rng.integers(3, 16, size=num))]


def compare(family: str, model, table) -> tuple[float, float]:
    """(fraction of stored ids equal to the reference, max |stored weight - reference weight|)."""
    num_layers, _, top_k = routing_shape(table)
    equal = total = 0
    max_diff = 0.0
    for row in table.to_pylist():
        input_ids = torch.tensor(row["input_ids"])
        reference, _ = reference_routing(family, model, input_ids)
        ids = np.array(row["topk_ids"]).reshape(num_layers, len(input_ids), top_k)
        weights = np.array(row["topk_weights"], dtype=np.float32).reshape(num_layers, len(input_ids), top_k)
        for layer, (ref_ids, ref_weights) in enumerate(reference):
            equal += int((ids[layer] == ref_ids.numpy()).sum())
            total += ref_ids.numel()
            max_diff = max(max_diff, float(np.abs(weights[layer] - ref_weights.numpy()).max()))
    return equal / total, max_diff


def family_row(family: str, root: Path, num_samples: int) -> dict:
    path = save_tiny_moe(family, root / family)
    model, tokenizer = load_checkpoint(CheckpointRef(family, 1, None, str(path)), ModelConfig(),
                                       cache_dir=str(root / "cache"), device="cpu")
    row = {"family": family, "class": type(model).__name__}
    try:
        recorder = RoutingRecorder(model, keep_input_ids=True)
    except ValueError as e:
        return {**row, "supported": "refused", "ids agreement": "", "weights max |diff|": "", "L/E/K": "",
                "reason": str(e)}
    table = recorder.record(random_samples(tokenizer, num_samples), checkpoint=family, step=1)
    agreement, max_diff = compare(family, model, table)
    num_layers, num_experts, top_k = routing_shape(table)
    return {**row, "supported": "yes", "ids agreement": f"{agreement:.2%}", "weights max |diff|": f"{max_diff:.1e}",
            "L/E/K": f"{num_layers}/{num_experts}/{top_k}"}


def unbuilt_row(family: str, supported: str, reason: str = "") -> dict:
    return {"family": family, "class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family], "supported": supported,
            "ids agreement": "", "weights max |diff|": "", "L/E/K": "", "reason": reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in sorted(moe_causal_lm_types()):
            if family in LOADED_AS_TEXT:
                rows.append(unbuilt_row(family, f"as {LOADED_AS_TEXT[family]}"))
            elif family in ADAPTERS or family in TINY_REFUSED:
                rows.append(family_row(family, Path(tmp), args.samples))
            else:
                reason = REFUSED.get(family, "no adapter")
                rows.append(unbuilt_row(family, "refused", f"{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]}: {reason}"))
    table = pd.DataFrame(rows)
    print(table.drop(columns="reason").to_string(index=False))
    print(f"\n{(table['supported'] == 'yes').sum()} recorded, {(table['supported'] == 'refused').sum()} refused, "
          f"{table['supported'].str.startswith('as ').sum()} loaded by AutoModelForCausalLM as their text model")
    for row in table[table["supported"] == "refused"].itertuples():
        print(f"refused {row.family}: {row.reason}")


if __name__ == "__main__":
    main()
