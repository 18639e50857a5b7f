"""What each metric claims, declared before any result: its direction and whether it is a monitor.

* Direction: +1 if the metric is expected to rise as a group generalizes, -1 to fall, 0 if nothing
  is declared. Declared here, in code, from the hypothesis each metric stands for (the paper's,
  or the OLMoE paper's for the routing analyses); never inferred from held-out accuracy. A metric
  without a declared direction gets no onset, no star and no detector.
* Monitor or retrospective (docs/analysis.md): a monitor's value at
  checkpoint t uses only checkpoints <= t and training-side data. A retrospective one needs a later
  checkpoint (a last-checkpoint reference; the memorized sample set, whose loss rule compares with
  the last checkpoint's loss). Retrospective values are flagged in every table and never starred,
  claimed as monitors or fed to the detector.

Position variants (`_answer`) share the direction of their base metric.
"""

from __future__ import annotations

DIRECTIONS = {
    # the paper (arXiv 2506.21551): pathways of a generalizing group become more shared (distance
    # falls) and smoother across layers: consecutive layers' routing more aligned (mean cosine rises)
    # and the consecutive cosines more uniform, so C = 1 - mean_l c_l / max_l c_l falls toward 0 (the
    # paper's prose: a higher C is "more erratic"; its abstract: pathways move from "non-smooth across
    # layers" to "more structured"). Its Table 1 correlates C positively with accuracy, against its own
    # definition and prose; the declaration follows the definition and the stated hypothesis, never a
    # correlation with accuracy (docs/metrics.md)
    "pathway_distance": -1, "pathway_distance_chars": -1, "pathway_distance_norm": -1, "pathway_length": -1,
    "mean_cos": 1, "mean_cos_median": 1, "consistency": -1, "consistency_median": -1,
    # Gu et al.: the embedding space becomes uniform (MED falls) as the model generalizes
    "med": -1, "med_cyclic": -1,
    # the trivial baselines: loss falls, step rises
    "loss_mean": -1, "loss_median": -1, "step": 1,
    # the OLMoE paper's routing analyses: routing saturates (agrees more with the reference) and
    # experts specialize (to a domain, to tokens; a less uniform load) as training settles
    "router_saturation": 1, "top1_agreement": 1, "router_saturation_previous": 1, "top1_previous": 1,
    "domain_specialization": 1, "vocab_specialization": 1, "load_entropy": -1,
}

RETROSPECTIVE = {
    "router_saturation": "saturation against the last checkpoint",
    "top1_agreement": "top-1 agreement with the last checkpoint",
}
RETROSPECTIVE_SAMPLE_SETS = {
    "memorized": "the memorized set's loss rule compares each loss with the last checkpoint's",
}
POSITION_SUFFIXES = ("_answer",)


def base_metric(metric: str) -> str:
    """The metric without its position suffix."""
    for suffix in POSITION_SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def direction(metric: str) -> int:
    """The declared direction (+1, -1), 0 when none is declared."""
    return DIRECTIONS.get(metric, DIRECTIONS.get(base_metric(metric), 0))


def retrospective_reason(metric: str, sample_set: str = "all") -> str:
    """Why a metric (on a sample set) is retrospective; "" for a monitor."""
    reasons = [RETROSPECTIVE.get(base_metric(metric), ""), RETROSPECTIVE_SAMPLE_SETS.get(str(sample_set), "")]
    return "; ".join(reason for reason in reasons if reason)


def is_retrospective(metric: str, sample_set: str = "all") -> bool:
    return bool(retrospective_reason(metric, sample_set))
