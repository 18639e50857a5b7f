"""One moegrok sweep: record -> reduce -> evaluate -> analyze -> report into one run directory.

    python jobs/sweep.py                                   # the toy zoo (make demo)
    python jobs/sweep.py stage=report run_dir=runs/toy     # re-run one stage from stored tables
    python jobs/sweep.py experiment=olmoe_1b_7b            # the paper's OLMoE protocol (GPUs)
    python jobs/sweep.py checkpoints.dir=ckpts watch.enabled=true watch.sentinel=DONE   # follow a training run
    python jobs/sweep.py --multirun metrics.weight_share=0.5,0.7,0.8 'run_dir=runs/thr${metrics.weight_share}'
    python jobs/sweep.py --multirun hydra/launcher=ray_grid metrics.weight_share=0.5,0.7,0.8 \\
        'run_dir=runs/thr${metrics.weight_share}'               # the grid points at once, as Ray tasks
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moegrok.config import check_command_line, register_configs
from moegrok.errors import exit_status
from moegrok.pipeline import run_sweep, run_watch

register_configs()
exit_statuses: list[int] = []  # hydra.main drops return values; one entry per (multi)run


class GridPointFailed(RuntimeError):
    """A grid point's sweep exited non-zero (failed units, or a user error it printed)."""


@hydra.main(config_path="../conf", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> None:
    def sweep() -> int:
        config = OmegaConf.to_object(cfg)
        return run_watch(config) if config.watch.enabled else run_sweep(config)

    status = exit_status(sweep)
    if status and HydraConfig.get().mode == RunMode.MULTIRUN:
        # a grid point may run in another process (hydra/launcher=ray_grid): Hydra reports a
        # grid point's exception after the whole grid ran, and the command exits 1
        detail = f", units failed: see {cfg.run_dir}/failures.parquet" if status == 1 else ""
        raise GridPointFailed(f"{cfg.run_dir}: exit status {status}{detail}")
    exit_statuses.append(status)


if __name__ == "__main__":
    if status := check_command_line(sys.argv[1:], config_name="sweep"):  # Hydra's own errors in one line
        sys.exit(status)
    main()
    sys.exit(max(exit_statuses, default=0))
