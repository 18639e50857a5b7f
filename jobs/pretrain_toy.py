"""Train the toy OLMoE zoo on multi-group modular arithmetic until it groks.

    python jobs/pretrain_toy.py                         # the default zoo, into zoo/default
    python jobs/pretrain_toy.py out_dir=zoo/p31 data.p=31 train.max_steps=800

Re-running resumes from the newest checkpoint; a zoo whose last checkpoint (step max_steps) and
training log exist is left as it is and only summarized.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moegrok.config import PretrainToyConfig, check_command_line, register_configs
from moegrok.errors import exit_status
from moegrok.toy.summary import print_summary

register_configs()
exit_statuses: list[int] = []  # hydra.main drops return values


def pretrain(cfg: DictConfig) -> int:
    config: PretrainToyConfig = OmegaConf.to_object(cfg)
    out = Path(config.out_dir)
    if not ((out / f"step{config.train.max_steps}").is_dir() and (out / "train_log.parquet").exists()):
        from moegrok.toy.train import train_toy  # torch and transformers only when there is training to do

        train_toy(config)
    print_summary(out)
    return 0


@hydra.main(config_path="../conf", config_name="pretrain_toy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_statuses.append(exit_status(lambda: pretrain(cfg)))


if __name__ == "__main__":
    if status := check_command_line(sys.argv[1:], config_name="pretrain_toy"):  # Hydra's own errors in one line
        sys.exit(status)
    main()
    sys.exit(max(exit_statuses, default=0))
