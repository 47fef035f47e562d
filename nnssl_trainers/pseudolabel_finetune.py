import os

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnssl.pseudolabel.dataset import is_pseudo_id
from nnssl.pseudolabel.heads import restore_segmentation_heads, source_checkpoints
from nnssl.pseudolabel.training_data import pseudo_label_dataloaders, write_split_of_real_cases
from nnssl.pseudolabel.weighting import pseudo_label_mask, pseudo_weighted_loss
from nnssl.split import SPLIT_FILE_NAME
from nnssl.tensors import unwrap
from nnssl.training.environment import ScheduleFromEnvironment
from nnssl.training.passes import SUPERVISED_PASSES


class nnUNetTrainerPseudoLabelFinetune(ScheduleFromEnvironment, nnUNetTrainer):
    """Stage 2 of the FLARE22 pseudo-labeling of Gao, Xu & Fei (docs/methods/pseudolabel.md): fine-tune the stage-1
    model on the labeled cases plus the selected pseudo-labeled cases (ids ``pl_*``, made by ``nnssl_pseudolabel``).

    Paper's Table 3, the defaults here: initialised from the stage-1 model (``-pretrained_weights``); Adam,
    lr 5e-5, no weight decay (none is listed); ``lr = 5e-5 * (1 - epoch/500)^0.9`` (the paper's formula, whose
    horizon of 500 epochs is longer than the 40-epoch schedule, so the lr only falls to ~93 %;
    ``lr_decay_horizon_epochs = None`` gives nnU-Net's horizon = ``num_epochs``); 40 epochs; **no data
    augmentation** in this stage (the paper augments only the initial stage). Loss: nnU-Net's Dice+CE with deep
    supervision (paper: Dice+CE). Every case counts the same, as in the paper, unless a variant says otherwise:

    - ``_plWeight05``: the pseudo-labeled samples of a batch get loss weight 0.5,
      ``L = (n_r L(real) + 0.5 n_p L(pseudo)) / (n_r + n_p)``
      (:func:`nnssl.pseudolabel.weighting.pseudo_weighted_loss`);
    - ``_plSampling05``: pseudo-labeled cases are drawn half as often as real ones (nnU-Net's data loader
      ``sampling_probabilities``, :func:`nnssl.pseudolabel.weighting.pseudo_sampling_probabilities`);
    - ``_DA``: nnU-Net's usual augmentation instead of none.

    Pseudo-labeled cases are never validated on; without ``splits_final.json`` the folds are nnU-Net's 5-fold split
    of the *real* labeled ids with every ``pl_`` case in every training fold. At the start of a fresh run the
    segmentation heads (which ``-pretrained_weights`` skips) are copied from the stage-1 model that
    ``ssl_split.json`` names, iff the rest of the network equals it (:mod:`nnssl.pseudolabel.heads`). Inference:
    the one network. The end-to-end recipe (``nnssl_pseudolabel --preprocess``, ``-pretrained_weights``), another
    round and the deviations forced by nnU-Net: docs/methods/pseudolabel.md.
    """

    pseudo_loss_weight: float = 1.0
    pseudo_sampling_weight: float = 1.0
    use_data_augmentation: bool = False
    lr_decay_horizon_epochs: int | None = 500
    network_passes = SUPERVISED_PASSES  # one network on labeled + pseudo-labeled patches

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 5e-5
        self.uses_nnunet_optimizer = False
        self.weight_decay = 0.0
        self.num_epochs = 40

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        # the horizon never ends before the schedule does: (1 - e/h)^0.9 must stay defined for every epoch e
        horizon = max(self.lr_decay_horizon_epochs or self.num_epochs, self.num_epochs)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, horizon)

    def train_step(self, batch: dict) -> dict:
        # nnU-Net's train_step with its loss replaced by the pseudo-weighted one (identical when the weight is 1)
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        is_pseudo = pseudo_label_mask(batch["keys"])
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            loss = pseudo_weighted_loss(self.loss, output, target, is_pseudo, self.pseudo_loss_weight)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    # ------------------------------------------------------------------ split and data
    def do_split(self):
        if self.fold != "all":
            write_split_of_real_cases(self)
        tr_keys, val_keys = super().do_split()
        moved = [k for k in val_keys if is_pseudo_id(k)]
        val_keys = [k for k in val_keys if not is_pseudo_id(k)]
        tr_keys = list(tr_keys) + [k for k in moved if k not in set(tr_keys)]
        if moved:
            self.print_to_log_file(f"{len(moved)} pseudo-labeled case(s) moved from validation to training")
        if not val_keys:
            raise RuntimeError(f"fold {self.fold}: no real labeled case left for validation (only pl_* cases)")
        n_pseudo = sum(is_pseudo_id(k) for k in tr_keys)
        self.print_to_log_file(f"training on {len(tr_keys) - n_pseudo} labeled + {n_pseudo} pseudo-labeled cases, "
                               f"validating on {len(val_keys)} labeled cases")
        if n_pseudo == 0:
            self.print_to_log_file("note: no pl_* case in this dataset; this is a plain fine-tuning")
        return tr_keys, val_keys

    def get_dataloaders(self):
        return pseudo_label_dataloaders(self, self.use_data_augmentation, self.pseudo_sampling_weight)

    # ------------------------------------------------------------------ initialisation from the stage-1 model
    def on_train_start(self):
        super().on_train_start()
        if self.current_epoch == 0:  # a fresh run; --c resumes with its own trained heads
            self.restore_pretrained_segmentation_heads()

    def restore_pretrained_segmentation_heads(self) -> bool:
        """Copy the segmentation heads from the source model of this dataset's newest pseudo-labels if the network
        already holds its other weights (it was given to ``-pretrained_weights``). Returns whether heads were copied."""
        from nnunetv2.paths import nnUNet_raw

        raw_split = os.path.join(str(nnUNet_raw), self.plans_manager.dataset_name, SPLIT_FILE_NAME) \
            if nnUNet_raw else None
        checkpoints = source_checkpoints([os.path.join(self.preprocessed_dataset_folder_base, SPLIT_FILE_NAME),
                                          raw_split])
        return restore_segmentation_heads(unwrap(self.network), checkpoints, self.print_to_log_file)


class nnUNetTrainerPseudoLabelFinetune_plWeight05(nnUNetTrainerPseudoLabelFinetune):
    pseudo_loss_weight = 0.5


class nnUNetTrainerPseudoLabelFinetune_plSampling05(nnUNetTrainerPseudoLabelFinetune):
    pseudo_sampling_weight = 0.5


class nnUNetTrainerPseudoLabelFinetune_DA(nnUNetTrainerPseudoLabelFinetune):
    use_data_augmentation = True
