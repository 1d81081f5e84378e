"""Train (or validate/test/predict) with QLoRA: `python train.py fit --config configs/7b.yaml`.

The same LightningCLI as the installed `qlora-lightning` command; see `qlora_lightning/cli.py`.
"""

from qlora_lightning.cli import main

if __name__ == "__main__":
    main()
