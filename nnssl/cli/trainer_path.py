"""``nnssl_trainer_path``: print the folder to put in ``nnUNet_extTrainer``.

Usage: ``export nnUNet_extTrainer="$(nnssl_trainer_path)"``. nnU-Net 2.8 searches that folder for any
``-tr`` name it does not find in its own package, for training and for prediction.
"""

import os

import nnssl_trainers


def trainer_folder() -> str:
    return os.path.abspath(list(nnssl_trainers.__path__)[0])


def main() -> None:
    print(trainer_folder())


if __name__ == "__main__":
    main()
