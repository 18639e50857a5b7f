"""An adapter for a family without a built-in one, named in a sweep's config and imported by every
record actor: `model.adapter=tests.reference.moe_adapter_example:remote_moe_adapter` (the family is in
tests/reference/remote_moe.py; its checkpoints load with `model.trust_remote_code=true`)."""

from moegrok.routing.adapters import LOGITS_WEIGHTS_IDS, MoeAdapter, config_int, parameter


def remote_moe_adapter() -> MoeAdapter:
    # its router, mlp.gate in each decoder layer, returns (logits, top-k weights, top-k ids); the
    # weights are a softmax over all experts, kept for the top k and renormalized to sum to 1
    return MoeAdapter(
        "mlp.gate",
        read=LOGITS_WEIGHTS_IDS,
        expert_rows=parameter("mlp.gate.weight"),  # (E, D): the rows that score each expert
        num_experts=config_int("num_local_experts"),
        top_k=config_int("num_experts_per_tok"),
        weight_sum=lambda config: 1.0,
    )
