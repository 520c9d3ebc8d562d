"""Train a toy target: `python -m experiments.train_target target=NAME [ship=true]`."""

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from apd.targets import PRETRAINED_DIR, save_target, train_target
from experiments import schema  # noqa: F401  (registers the config schemas)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_target")
def main(cfg: DictConfig) -> None:
    schema.exit_on_unknown_keys(cfg)  # before anything trains: a +key typo is refused, not ignored
    app: schema.TrainTargetApp = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    torch.set_num_threads(app.threads)
    out = Path(HydraConfig.get().runtime.output_dir)
    model, info = train_target(app.target)
    save_target(model, app.target, info, out / f"{app.target.name}.pt")
    if app.ship:
        save_target(model, app.target, info, PRETRAINED_DIR / f"{app.target.name}.pt")
    print(json.dumps(info, indent=2))
    print(f"target written to {out}" + (f" and {PRETRAINED_DIR}" if app.ship else ""))


if __name__ == "__main__":
    main()
