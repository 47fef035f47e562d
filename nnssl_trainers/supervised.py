from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnssl.training.environment import ScheduleFromEnvironment
from nnssl.training.passes import SUPERVISED_PASSES


class nnUNetTrainerSupervised(ScheduleFromEnvironment, nnUNetTrainer):
    """Plain nnUNetTrainer on the labeled cases, with the nnssl schedule overrides (``NNSSL_*``) and folds that fit
    ``ssl_split.json``: the baseline every SSL trainer is compared with (same labeled cases, same iterations)."""

    network_passes = SUPERVISED_PASSES  # nnU-Net's step
