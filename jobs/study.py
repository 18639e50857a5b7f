"""The science study: toy zoos trained and swept end to end; the between-group contrast and a
detector scored leave one zoo out with bootstrap intervals, against baselines told the same.
Resumable: finished zoos and sweep units are skipped.

    python jobs/study.py findings_dir=docs/findings    # the design (conf/study.yaml) + committed CSVs
    python jobs/study.py render_only=true findings_dir=docs/findings   # re-render docs/findings.md
    python jobs/study.py --config-name study_smoke     # 2 tiny zoos (the test suite)
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moegrok.config import StudyConfig, check_command_line, register_configs
from moegrok.errors import exit_status
from moegrok.report.study import headline_summary
from moegrok.study.run import run_study

register_configs()
exit_statuses: list[int] = []  # hydra.main drops return values


def study(cfg: DictConfig) -> int:
    config: StudyConfig = OmegaConf.to_object(cfg)
    if config.render_only:
        from pathlib import Path

        from moegrok.study.findings import render_into

        render_into(Path(config.findings_dir).with_suffix(".md"), Path(config.findings_dir))
        print(f"re-rendered {Path(config.findings_dir).with_suffix('.md')} from {config.findings_dir}/*.csv")
        return 0
    print(headline_summary(run_study(config), cfg=config))
    print(f"tables (*.parquet) and study.html in {config.out_dir}")
    return 0


@hydra.main(config_path="../conf", config_name="study", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_statuses.append(exit_status(lambda: study(cfg)))


if __name__ == "__main__":
    if status := check_command_line(sys.argv[1:], config_name="study"):  # Hydra's own errors in one line
        sys.exit(status)
    main()
    sys.exit(max(exit_statuses, default=0))
