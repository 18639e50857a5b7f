"""The science study: toy-zoo variants trained and swept end to end, pathway metrics against
the trivial baselines. Resumable: finished zoos and sweep units are skipped.

    python jobs/study.py                               # the full design (~2 h on 2 cores)
    python jobs/study.py --config-name study_smoke     # 2 tiny variants (CI)
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moegrok.config import StudyConfig, register_configs
from moegrok.errors import exit_status
from moegrok.study import run_study, study_summary

register_configs()
exit_statuses: list[int] = []  # hydra.main drops return values


def study(cfg: DictConfig) -> int:
    config: StudyConfig = OmegaConf.to_object(cfg)
    table = study_summary(run_study(config), config.target)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}") if len(table) else "no group grokked")
    print(f"study.parquet and study.html in {config.out_dir}")
    return 0


@hydra.main(config_path="../conf", config_name="study", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_statuses.append(exit_status(lambda: study(cfg)))


if __name__ == "__main__":
    main()
    sys.exit(max(exit_statuses, default=0))
