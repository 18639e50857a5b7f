from moegrok.metrics.declarations import direction, is_retrospective, retrospective_reason
from moegrok.pipeline.reduce_analyses import METRIC_COLUMNS

REDUCE_METRICS = ["pathway_distance", "pathway_distance_chars", "pathway_distance_norm", "pathway_length", "mean_cos",
                  "mean_cos_median", "consistency", "consistency_median", "loss_mean", "loss_median", "med",
                  "med_cyclic", *METRIC_COLUMNS.values()]


def test_every_metric_the_sweep_writes_has_a_declared_direction():
    for metric in REDUCE_METRICS:
        assert direction(metric) in (1, -1), metric
        assert direction(metric + "_answer") == direction(metric)
    assert direction("pathway_distance") == -1 and direction("mean_cos") == 1 and direction("med") == -1
    assert direction("consistency") == -1  # C falls as consecutive cosines become uniform (the paper's prose)
    assert direction("something_new") == 0  # never inferred


def test_retrospective_metrics_and_sample_sets():
    assert is_retrospective("router_saturation") and is_retrospective("top1_agreement_answer")
    assert not is_retrospective("router_saturation_previous") and not is_retrospective("top1_previous")
    assert is_retrospective("pathway_distance", "memorized") and not is_retrospective("pathway_distance", "all")
    assert "last checkpoint" in retrospective_reason("router_saturation")
