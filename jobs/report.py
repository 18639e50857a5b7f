"""Re-run the analysis and the HTML report of a finished sweep from its stored tables.

    python jobs/report.py runs/toy
    python jobs/report.py runs/toy analysis.sample_set=all analysis.min_rise=0.2
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moegrok.config import MonitorConfig, Stage, register_configs
from moegrok.errors import exit_status
from moegrok.pipeline import run_monitor

register_configs()


def main() -> int:
    if len(sys.argv) < 2 or "=" in sys.argv[1]:
        raise SystemExit("usage: python jobs/report.py RUN_DIR [key=value ...]")
    run_dir, overrides = sys.argv[1], sys.argv[2:]
    stored = OmegaConf.load(f"{run_dir}/config.yaml")
    with hydra.initialize(config_path="../conf", version_base="1.3"):
        cfg: DictConfig = hydra.compose(config_name="monitor", overrides=overrides)
    cfg = OmegaConf.merge(cfg, stored, OmegaConf.from_dotlist(overrides), {"run_dir": run_dir})
    config: MonitorConfig = OmegaConf.to_object(cfg)
    return run_monitor(config, stages=[Stage.analyze, Stage.report])


if __name__ == "__main__":
    sys.exit(exit_status(main))
