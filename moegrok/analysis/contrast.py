"""Between-group contrast: how much a group's metric moved since it memorized, beyond a reference.

Within one run the checkpoint step is the same for every group, so a per-group correlation with
accuracy cannot separate a metric's signal from time. A contrast can: for group G with
memorization checkpoint t0 (its train accuracy first >= 0.99, a training-side quantity), metric m
and reference R,

    change_G(t) = m_G(t) - m_G(t0),    did_G(t) = change_G(t) - change_R(t)

(a difference in differences). R is the control group (one known not to generalize, e.g. the toy's
`mul`; `analysis.control`) and, for the control itself or without one, the mean change of the other
groups. `z` = direction(m) * did / se is positive when G moved the declared generalizing way more
than R did; `self_z` is the same for change_G alone (no reference).

Uncertainty: a paired bootstrap over samples. Each group's samples are resampled (multinomial
counts w, `bootstrap` draws, seeded) and the same draw is used at t and at t0, since the same
training samples are measured at every checkpoint; groups are resampled independently. Means
are w-weighted; a pairwise distance is w'Dw / ((sum w)^2 - sum w^2), the mean over pairs of
distinct samples, each weighted by the product of their counts. `se` is the bootstrap standard
deviation, `ci_low`/`ci_high` its 2.5/97.5 percentiles. Every value uses checkpoints t0..t only:
a monitor.

The model-wide embedding measure (MED) has one value for all groups, so its did is 0 by
construction and left NaN; its self change is bootstrapped over the p-1 consecutive differences.

`run_contrasts` writes a run's contrast.parquet: every per-sample metric's contrast, plus the
model-wide MED, always on all recorded training samples (the memorized set is retrospective, and a
paired bootstrap needs the same samples at every checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moegrok.metrics.declarations import direction
from moegrok.metrics.embedding import consecutive_diffs
from moegrok.metrics.series import (
    GroupSeries,
    checkpoint_dirs,
    checkpoint_series,
    position_suffixes,
    present_samples,
    read_checkpoint,
    sample_metric_specs,
)
from moegrok.store import (
    RunDir,
    done_fingerprint,
    fingerprint,
    is_done,
    load_safetensors,
    mark_done,
    read_parquet,
    write_parquet,
)

CONTROL_MEAN = "others"  # the reference name when the other groups' mean is the reference
# contrast.parquet: "control" (each group against `analysis.control`, the control against the others' mean),
# only when a control is configured, and "others" (each group against the other groups' mean)
MODES = ("control", "others")


def bootstrap_weights(num_samples: int, *, num_draws: int, seed: int) -> np.ndarray:
    """Multinomial resampling counts (num_draws, num_samples); row 0 is the identity draw."""
    rng = np.random.default_rng(seed)
    weights_BN = rng.multinomial(num_samples, np.full(num_samples, 1.0 / num_samples), size=num_draws + 1)
    weights_BN[0] = 1
    return weights_BN.astype(np.float64)


def statistic(series: GroupSeries, weights_BN: np.ndarray) -> np.ndarray:
    """The metric at every checkpoint under every draw: (draws, checkpoints); draw 0 is the metric."""
    if series.kind == "mean":
        values_CN = series.values
        present_CN = np.isfinite(values_CN)
        total_BC = weights_BN @ np.where(present_CN, values_CN, 0.0).T
        return total_BC / np.maximum(weights_BN @ present_CN.T.astype(np.float64), 1e-12)
    distances_CNN = series.values
    out_BC = np.empty((len(weights_BN), len(distances_CNN)))
    for c, distances_NN in enumerate(distances_CNN):
        present_BN = weights_BN * np.isfinite(np.diagonal(distances_NN))  # a sample without a pathway: weight 0
        pairs_B = present_BN.sum(1) ** 2 - (present_BN**2).sum(1)
        out_BC[:, c] = ((present_BN @ np.nan_to_num(distances_NN)) * present_BN).sum(1) / np.maximum(pairs_B, 1e-12)
    return out_BC


def _z(value: float, se: float, sign: int) -> float:
    """The standardized change in the declared direction; NaN without a spread or a direction."""
    return sign * value / se if np.isfinite(se) and se > 0 and sign else float("nan")


def _changes(stat_BC: np.ndarray, start: int) -> np.ndarray:
    return stat_BC - stat_BC[:, [start]]


def group_weights(num_samples: dict[str, int], *, num_draws: int, seed: int) -> dict[str, np.ndarray]:
    """Each group's bootstrap draws (groups resampled independently, seeded by their sorted order)."""
    return {group: bootstrap_weights(num_samples[group], num_draws=num_draws, seed=seed * 1000 + index)
            for index, group in enumerate(sorted(num_samples))}


def group_contrasts(series: dict[str, GroupSeries], steps: np.ndarray, memorization: dict[str, float], *,
                    metric: str, control: str | None, num_draws: int = 200, seed: int = 0,
                    exclude: str | None = None) -> pd.DataFrame:
    """Contrast rows of one metric: every group with a memorization step, every checkpoint from it
    on. `series`: per group, the metric's per-sample values at `steps` (moegrok/metrics/series.py)."""
    weights = group_weights({g: s.num_samples for g, s in series.items()}, num_draws=num_draws, seed=seed)
    stats_BC = {group: statistic(series[group], weights[group]) for group in series}
    return statistic_contrasts(stats_BC, steps, memorization, metric=metric, control=control, exclude=exclude)


def statistic_contrasts(stats_BC: dict[str, np.ndarray], steps: np.ndarray, memorization: dict[str, float], *,
                        metric: str, control: str | None, exclude: str | None = None) -> pd.DataFrame:
    """Contrast rows from each group's metric under every draw (draws + 1, checkpoints), draw 0 the
    metric itself (`statistic`). `exclude` (the control, in the `others` mode) is left out of the
    other groups' mean of every group but itself."""
    if control is not None and control not in stats_BC:
        raise ValueError(f"analysis.control={control!r}: no such group (groups: {sorted(stats_BC)})")
    groups = sorted(stats_BC)
    sign = direction(metric)
    rows = []
    for group in groups:
        if group not in memorization or not (steps >= memorization[group]).any():
            continue
        start = int(np.argmax(steps >= memorization[group]))
        change_BC = _changes(stats_BC[group], start)
        if control is not None and group != control:
            reference, others = control, [control]
        else:  # the others' mean leaves out the control (a canary): it is a reference of its own
            reference, others = CONTROL_MEAN, [g for g in groups if g not in (group, exclude)] or [
                g for g in groups if g != group]
        reference_BC = (np.mean([_changes(stats_BC[g], start) for g in others], axis=0) if others
                        else np.full_like(change_BC, np.nan))
        did_BC = change_BC - reference_BC
        later = slice(start + 1, len(steps))  # an interval needs a change: none at t0 itself
        se_C, self_se_C, low_C, high_C = (np.full(len(steps), np.nan) for _ in range(4))
        draws_CB = np.ascontiguousarray(did_BC[1:, later].T)  # a row per checkpoint: sums as np.std of one
        se_C[later], self_se_C[later] = draws_CB.std(axis=1), np.ascontiguousarray(change_BC[1:, later].T).std(axis=1)
        if later.start < len(steps):
            low_C[later], high_C[later] = np.quantile(draws_CB, [0.025, 0.975], axis=1)
        for c in range(start, len(steps)):
            did = did_BC[0, c]
            rows.append({
                "group": group, "reference": reference, "metric": metric, "step": int(steps[c]),
                "memorization_step": float(memorization[group]), "direction": sign,
                "level": stats_BC[group][0, c], "change": change_BC[0, c], "reference_change": reference_BC[0, c],
                "did": did, "se": float(se_C[c]), "ci_low": float(low_C[c]), "ci_high": float(high_C[c]),
                "z": _z(did, float(se_C[c]), sign), "self_se": float(self_se_C[c]),
                "self_z": _z(change_BC[0, c], float(self_se_C[c]), sign),
            })
    return pd.DataFrame(rows)


def model_wide_contrasts(diffs_CP: np.ndarray, steps: np.ndarray, memorization: dict[str, float], *,
                         metric: str, num_draws: int = 200, seed: int = 0) -> pd.DataFrame:
    """Rows for a model-wide metric that is a mean over terms (MED: the consecutive embedding
    differences, (checkpoints, terms)): the same value for every group, its self change
    bootstrapped over the terms, no contrast."""
    weights_BP = bootstrap_weights(diffs_CP.shape[1], num_draws=num_draws, seed=seed)
    stat_BC = weights_BP @ diffs_CP.T / weights_BP.sum(1, keepdims=True)
    sign = direction(metric)
    rows = []
    for group, mem_step in sorted(memorization.items()):
        if not (steps >= mem_step).any():
            continue
        start = int(np.argmax(steps >= mem_step))
        change_BC = _changes(stat_BC, start)
        for c in range(start, len(steps)):
            self_se = float(np.std(change_BC[1:, c])) if c > start else float("nan")
            rows.append({
                "group": group, "reference": "none", "metric": metric, "step": int(steps[c]),
                "memorization_step": float(mem_step), "direction": sign, "level": stat_BC[0, c],
                "change": change_BC[0, c], "reference_change": float("nan"), "did": float("nan"),
                "se": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "z": float("nan"),
                "self_se": self_se, "self_z": _z(change_BC[0, c], self_se, sign),
            })
    return pd.DataFrame(rows)


def contrast_summary(contrast: pd.DataFrame) -> pd.DataFrame:
    """Per metric and group, the contrast at the last checkpoint: did [95% CI] and whether the CI
    lies on the declared side of 0 ("as declared"), on the other side ("against") or covers 0."""
    last = contrast.dropna(subset=["did"]).sort_values("step").groupby(["metric", "group"], sort=True).tail(1)
    rows = []
    for row in last.itertuples(index=False):
        low, high = row.direction * row.ci_low, row.direction * row.ci_high
        side = "as declared" if min(low, high) > 0 else "against" if max(low, high) < 0 else "covers 0"
        rows.append({"metric": row.metric, "group": row.group, "reference": row.reference, "step": row.step,
                     "did": row.did, "ci_low": row.ci_low, "ci_high": row.ci_high, "z": row.z, "verdict": side})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- contrast.parquet of a run
def med_diffs(run: RunDir, checkpoints: pd.DataFrame) -> np.ndarray | None:
    """(checkpoints, p-1) consecutive residue-embedding differences, None without residue embeddings."""
    rows = []
    for name in checkpoints["checkpoint"]:
        path = run.checkpoint_weights(name)
        weights = load_safetensors(path) if path.exists() else {}
        if "residue_embeddings" not in weights:
            return None
        rows.append(consecutive_diffs(weights["residue_embeddings"]))
    return np.stack(rows)


def _checkpoint_statistics(path: Path, ids: dict[str, np.ndarray], specs: dict, weights: dict[str, np.ndarray]
                           ) -> tuple[int, str, pd.DataFrame]:
    """(step, checkpoint name, one row per metric and group with the statistic under every draw)."""
    rows = read_checkpoint(path, ["checkpoint", "step", "group", "sample_id", *{s[1] for s in specs.values()}])
    stats = []
    for group, members in rows.groupby("group"):
        if group in ids:
            aligned = members.set_index("sample_id").reindex(ids[group])
            stats += [{"metric": metric, "group": group,
                       "draws": statistic(checkpoint_series(aligned, spec), weights[group])[:, 0]}
                      for metric, spec in specs.items()]
    return int(rows["step"].iloc[0]), str(rows["checkpoint"].iloc[0]), pd.DataFrame(stats)


def _cached_statistics(run: RunDir, path: Path, inputs: dict, ids, specs, weights) -> tuple[int, str, pd.DataFrame]:
    """A checkpoint's statistics from parts/contrast/, computed and kept there when its features, the
    samples, the draws or the metrics changed: adding a checkpoint computes the new one alone."""
    part = run.root / "parts" / "contrast" / f"{path.name}.parquet"
    inputs = {**inputs, "features": sorted(done_fingerprint(file) or file.name for file in path.glob("*.parquet"))}
    if is_done(part, fingerprint(inputs)):
        table = read_parquet(part)
        return int(table["step"].iloc[0]), str(table["checkpoint"].iloc[0]), table
    step, name, table = _checkpoint_statistics(path, ids, specs, weights)
    write_parquet(table.assign(step=step, checkpoint=name), part)
    mark_done(part, inputs)
    return step, name, table


def run_contrasts(run: RunDir, memorization: dict[str, float], *, control: str | None, num_draws: int,
                  seed: int = 0) -> pd.DataFrame:
    """The contrast table of a run: columns mode, group, reference, metric, step, ... (contrast.py).
    Each checkpoint's statistics under every draw are computed once from sample_metrics/ and kept
    (parts/contrast/), so memory does not grow with the per-sample rows of all checkpoints and a
    new checkpoint costs its own statistics; the rows then follow from them."""
    samples = read_parquet(run.samples, columns=["sample_id", "group", "shard"])
    ids, columns = present_samples(run.sample_metrics, samples)
    ids = {group: members for group, members in ids.items() if len(members) >= 2}
    if control is not None and control not in ids:
        raise ValueError(f"analysis.control={control!r}: no such group in the samples (groups: {sorted(ids)})")
    if len(ids) < 2:
        return pd.DataFrame()
    specs = {metric: spec for metric, spec in sample_metric_specs(position_suffixes(columns)).items()
             if spec[1] in columns}  # what the reduce stored
    weights = group_weights({group: len(members) for group, members in ids.items()}, num_draws=num_draws, seed=seed)
    inputs = {"samples": fingerprint({group: members.tolist() for group, members in ids.items()}),
              "draws": num_draws, "seed": seed, "metrics": sorted(specs)}
    stats: dict[str, dict[str, list[np.ndarray]]] = {metric: {group: [] for group in ids} for metric in specs}
    checkpoints = []
    for path in checkpoint_dirs(run.sample_metrics):  # in step order below
        step, name, table = _cached_statistics(run, path, inputs, ids, specs, weights)
        checkpoints.append((step, name))
        draws = {(row.metric, row.group): np.asarray(row.draws) for row in table.itertuples(index=False)}
        for metric in specs:
            for group in ids:
                stats[metric][group].append(draws[metric, group][:, None])
    by_step = pd.DataFrame(checkpoints, columns=["step", "checkpoint"]).sort_values("step", kind="stable")
    order, steps = by_step.index.to_numpy(), by_step["step"].to_numpy()
    frames = []
    for metric, per_group in stats.items():
        stats_BC = {group: np.concatenate(columns_B1, axis=1)[:, order] for group, columns_B1 in per_group.items()}
        for mode in MODES if control is not None else MODES[1:]:
            frame = statistic_contrasts(stats_BC, steps, memorization, metric=metric,
                                        control=control if mode == "control" else None, exclude=control)
            frames.append(frame.assign(mode=mode))
    diffs_CP = med_diffs(run, by_step)
    if diffs_CP is not None:
        frames.append(model_wide_contrasts(diffs_CP, steps, memorization, metric="med",
                                           num_draws=num_draws, seed=seed).assign(mode="self"))
    table = with_trajectory_noise(pd.concat(frames, ignore_index=True))
    return table[["mode", *[c for c in table.columns if c != "mode"]]]


def trajectory_se(values: np.ndarray) -> np.ndarray:
    """Causal run noise of a series from its first value (t0) on: at index c, the standard deviation
    (ddof 1) of its increments over indices 1..c; NaN before two increments. A series that only
    jitters from checkpoint to checkpoint by s has increments of spread s*sqrt(2), the spread of its
    change since t0, so this is the run's noise on a change; a steady trend has small increments."""
    values = np.asarray(values, dtype=float)
    out = np.full(len(values), np.nan)
    increments = np.diff(values)
    for c in range(2, len(values)):
        seen = increments[:c]
        seen = seen[np.isfinite(seen)]
        if len(seen) >= 2:
            out[c] = float(np.std(seen, ddof=1))
    return out


def with_trajectory_noise(table: pd.DataFrame) -> pd.DataFrame:
    """`z` and `self_z` against both noises: the sample bootstrap's se and the run's own trajectory
    noise (`trajectory_se` of did, resp. change, since memorization), combined in quadrature
    (`z_samples`, `self_z_samples` keep the bootstrap-only values). The interval covers resampling
    the recorded samples and checkpoint-to-checkpoint jitter of this run; not other seeds."""
    if table.empty or "did" not in table:
        return table
    keys = [k for k in ("zoo", "mode", "metric", "group") if k in table]
    table = table.sort_values([*keys, "step"], kind="stable").reset_index(drop=True)
    out = table.copy()
    out["z_samples"], out["self_z_samples"] = table["z"], table["self_z"]
    trajectory = np.full(len(table), np.nan)
    self_trajectory = np.full(len(table), np.nan)
    for _, index in table.groupby(keys, sort=False).indices.items():
        trajectory[index] = trajectory_se(table["did"].to_numpy()[index])
        self_trajectory[index] = trajectory_se(table["change"].to_numpy()[index])
    out["trajectory_se"], out["self_trajectory_se"] = trajectory, self_trajectory
    sign = table["direction"].to_numpy(float)
    se = np.hypot(table["se"].to_numpy(float), trajectory)
    self_se = np.hypot(table["self_se"].to_numpy(float), self_trajectory)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["z"] = np.where((se > 0) & (sign != 0), sign * table["did"].to_numpy(float) / se, np.nan)
        out["self_z"] = np.where((self_se > 0) & (sign != 0), sign * table["change"].to_numpy(float) / self_se, np.nan)
    return out
