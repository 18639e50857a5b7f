"""One moegrok sweep: record -> reduce -> evaluate -> analyze -> report into one run directory.

    python jobs/monitor.py                                   # the toy zoo (make demo)
    python jobs/monitor.py stage=report run_dir=runs/toy     # re-run one stage from stored tables
    python jobs/monitor.py experiment=olmoe_1b_7b            # the paper's OLMoE protocol (GPUs)
    python jobs/monitor.py checkpoints.dir=ckpts watch.enabled=true watch.sentinel=DONE   # follow a training run
    python jobs/monitor.py --multirun metrics.threshold=0.5,0.7,0.8 'run_dir=runs/thr${metrics.threshold}'
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moegrok.config import register_configs
from moegrok.errors import exit_status
from moegrok.pipeline import run_monitor, watch

register_configs()
exit_statuses: list[int] = []  # hydra.main drops return values; one entry per (multi)run


@hydra.main(config_path="../conf", config_name="monitor", version_base="1.3")
def main(cfg: DictConfig) -> None:
    def sweep() -> int:
        config = OmegaConf.to_object(cfg)
        return watch(config) if config.watch.enabled else run_monitor(config)

    exit_statuses.append(exit_status(sweep))


if __name__ == "__main__":
    main()
    sys.exit(max(exit_statuses, default=0))
