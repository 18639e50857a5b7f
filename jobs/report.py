"""Re-run the analysis and the HTML report of finished sweeps from their stored tables; given
several run directories (a grid), also one page that puts them side by side.

    python jobs/report.py runs/toy
    python jobs/report.py runs/toy analysis.sample_set=all analysis.min_rise=0.2
    python jobs/report.py runs/thr0.5 runs/thr0.7 runs/thr0.8              # + runs/grid.html, runs/grid.parquet
    python jobs/report.py runs/thr* --out runs/thr_grid                    # the grid page elsewhere

Arguments that are directories are run directories, the others key=value overrides applied to
each run. The grid page goes to --out, by default the run directories' common parent.
"""

import argparse
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moegrok.config import Stage, SweepConfig, check_overrides, register_configs
from moegrok.errors import exit_status
from moegrok.pipeline import run_sweep
from moegrok.report.grid import write_grid_report

register_configs()


def stored_config(run_dir: str, overrides: list[str]) -> SweepConfig:
    """The run's stored config.yaml with the overrides on top."""
    stored = OmegaConf.load(f"{run_dir}/config.yaml")
    with hydra.initialize(config_path="../conf", version_base="1.3"):
        cfg: DictConfig = hydra.compose(config_name="sweep", overrides=overrides)
    return OmegaConf.to_object(OmegaConf.merge(cfg, stored, OmegaConf.from_dotlist(overrides), {"run_dir": run_dir}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arguments", nargs="+", metavar="RUN_DIR | key=value")
    parser.add_argument("--out", help="directory of the grid page (default: the run dirs' common parent)")
    args = parser.parse_args()
    run_dirs = [a for a in args.arguments if Path(a).is_dir()]
    overrides = [a for a in args.arguments if not Path(a).is_dir()]
    for argument in overrides:
        if "=" not in argument:
            parser.error(f"{argument!r} is neither a run directory nor a key=value override")
    if not run_dirs:
        parser.error("no run directory given")
    check_overrides("sweep", overrides)  # a misspelt key or a bad value: one line, exit 2
    status = max(run_sweep(stored_config(d, overrides), stages=[Stage.analyze, Stage.report]) for d in run_dirs)
    if len(run_dirs) > 1 or args.out:
        out = args.out or os.path.commonpath([str(Path(d).resolve()) for d in run_dirs])
        print(f"grid report: {write_grid_report(run_dirs, out)}")
    return status


if __name__ == "__main__":
    sys.exit(exit_status(main))
