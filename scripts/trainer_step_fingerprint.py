"""The numbers of a trainer's step, to check that a change of the code leaves them unchanged.

Runs 4 ``train_step`` of ``nnUNetTrainer<NAME>`` on CPU on a tiny 2d plans with fixed seeds (two epochs, so SDCL
switches stages) and saves the loss of each step and the weights of every network. Run it once with each version
of the code on ``PYTHONPATH`` (e.g. a ``git worktree`` of the old commit), then compare the two files with
``scripts/compare_trainer_fingerprints.py``::

    PYTHONPATH=OLD_TREE python scripts/trainer_step_fingerprint.py CPS old_CPS.pt /tmp/w_old
    PYTHONPATH=.        python scripts/trainer_step_fingerprint.py CPS new_CPS.pt /tmp/w_new
    python scripts/compare_trainer_fingerprints.py old_CPS.pt new_CPS.pt

Usage: ``trainer_step_fingerprint.py NAME OUT.pt WORK_DIR`` (NAME without ``nnUNetTrainer``).
"""
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

trainer_name, out_path, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
# the tiny plans of the unit tests (this checkout's tests/, whichever code tree is on PYTHONPATH)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy  # noqa: E402
from tiny_trainer import DATASET, DATASET_JSON, PATCH, K, tiny_plans  # noqa: E402

pre = work / "preprocessed"
folder = pre / DATASET / "nnUNetPlans_2d"
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for key in ("case_a", "case_b", "case_c"):
    seg = rng.integers(0, K, (1, 1, 8, PATCH)).astype(np.int8)
    nnUNetDatasetNumpy.save_case(rng.normal(size=seg.shape).astype(np.float32), seg, {"spacing": [1.0, 1.0, 1.0]},
                                 str(folder / key))
(pre / DATASET / "splits_final.json").write_text(json.dumps([{"train": ["case_a", "case_b"], "val": ["case_c"]}]))
os.environ.update(nnUNet_preprocessed=str(pre), nnUNet_results=str(work / "results"), nnUNet_compile="false")
from nnunetv2.utilities.find_objects import recursive_find_python_class  # noqa: E402

cls = recursive_find_python_class(str(Path(importlib.import_module("nnssl_trainers").__path__[0])),
                                  f"nnUNetTrainer{trainer_name}", "nnssl_trainers")
torch.manual_seed(0)
trainer = cls(tiny_plans(), "2d", 0, DATASET_JSON, torch.device("cpu"))
trainer.initialize()
trainer.num_epochs = 4
losses = []
for step in range(4):
    trainer.current_epoch = step // 2
    trainer.on_train_epoch_start()
    g = torch.Generator().manual_seed(100 + step)
    labels = torch.randint(0, K, (2, 1, PATCH, PATCH), generator=g).float()
    batch = {"data": torch.randn(2, 1, PATCH, PATCH, generator=g),
             "target": [labels, labels[:, :, ::2, ::2], labels[:, :, ::4, ::4]], "keys": ["a", "b"],
             "unlabeled_data": torch.randn(2, 1, PATCH, PATCH, generator=g), "unlabeled_keys": ["u", "v"]}
    torch.manual_seed(1000 + step)
    losses.append(float(trainer.train_step(batch)["loss"]))
weights = {"network": {k: v.clone() for k, v in trainer.network.state_dict().items()}}
for name, net in trainer.extra_networks.items():
    # names of nnssl 0.1 -> now
    weights[{"network_b": "network2", "student2": "network2"}.get(name, name)] = {
        k: v.clone() for k, v in net.state_dict().items()}
torch.save({"losses": losses, "weights": weights}, out_path)
print(trainer_name, losses)
