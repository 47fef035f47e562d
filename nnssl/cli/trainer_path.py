"""``nnssl_trainer_path``: print the folder to put in ``nnUNet_extTrainer``.

Usage: ``export nnUNet_extTrainer="$(nnssl_trainer_path)"``. nnU-Net 2.8 searches that folder for any
``-tr`` name it does not find in its own package, for training and for prediction.

The library never imports the plugin: the folder is located with :func:`importlib.util.find_spec`, which does not
run the plugin's code.
"""

import importlib.util
import os

PLUGIN_PACKAGE = "nnssl_trainers"


def trainer_folder() -> str:
    spec = importlib.util.find_spec(PLUGIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the nnssl trainer plugin ({PLUGIN_PACKAGE}) is not installed: reinstall nnssl")
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def main() -> None:
    print(trainer_folder())


if __name__ == "__main__":
    main()
