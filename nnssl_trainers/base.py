"""The base every nnssl trainer builds on.

``nnUNetTrainerSSLBase`` keeps nnU-Net's training loop, labeled data loader, augmentation, deep supervision,
mixed precision, torch.compile and DDP as they are, and adds:

- an unlabeled data loader (``<data_identifier>_unlabeled``, written by ``nnssl_plan_and_preprocess``) with the
  same spatial and intensity augmentation in nnU-Net's background workers; ``train_step`` receives one batch
  ``{'data', 'target', 'keys', 'unlabeled_data', 'unlabeled_keys'}``;
- extra networks as first-class state (a second trainable network with its own optimizer and lr scheduler,
  or a non-trainable EMA teacher): built from the same plans, moved to the device, compiled / DDP-wrapped like
  ``self.network``, saved in every checkpoint and restored by ``--c``. ``network_weights`` in the checkpoint is
  always ``self.network``, the model ``nnUNetv2_predict`` uses;
- per-epoch SSL diagnostics (any extra scalar a ``train_step`` returns) in the log, ``ssl_progress.json``
  and ``ssl_progress.png`` next to nnU-Net's ``progress.png``;
- schedule overrides from the environment for smoke runs and benchmarks (see ``ScheduleFromEnvironment``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnssl.diagnostics import DEFAULT_CONFIDENCE_THRESHOLD, pseudo_label_confidence_stats
from nnssl.preprocessing.unlabeled import completed_cases, unlabeled_folder, withheld_labels_folder

ENV_NUM_EPOCHS = "NNSSL_NUM_EPOCHS"
ENV_ITERATIONS = "NNSSL_ITERATIONS_PER_EPOCH"
ENV_VAL_ITERATIONS = "NNSSL_VAL_ITERATIONS_PER_EPOCH"
ENV_SAVE_EVERY = "NNSSL_SAVE_EVERY"
ENV_LABELED_BS = "NNSSL_LABELED_BATCH_SIZE"
ENV_UNLABELED_BS = "NNSSL_UNLABELED_BATCH_SIZE"
ENV_SKIP_FINAL_VALIDATION = "NNSSL_SKIP_FINAL_VALIDATION"
ENV_INITIAL_LR = "NNSSL_INITIAL_LR"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be a positive integer") from None
    if parsed < 1:
        raise ValueError(f"environment variable {name}={value!r} must be a positive integer")
    return parsed


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    if isinstance(module, DDP):
        module = module.module
    if isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


class IterationTimer:
    """Mixin: logs the wall time per training iteration of every epoch (``train seconds/iteration: X``), which
    the benchmark reads. ``train_step`` returns a CPU copy of the loss, so CUDA work is finished when timed."""

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._train_epoch_started = time.perf_counter()

    def on_train_epoch_end(self, train_outputs: list[dict]):
        elapsed = time.perf_counter() - self._train_epoch_started
        self.print_to_log_file(f"train seconds/iteration: {elapsed / max(1, len(train_outputs)):.4f}")
        super().on_train_epoch_end(train_outputs)


MIN_CASES_FOR_CROSS_VALIDATION = 5


class FoldsFromSplitFile:
    """Mixin: folds that fit ``ssl_split.json`` (the copy ``nnssl_plan_and_preprocess`` puts next to the plans).

    - a numbered fold without ``splits_final.json`` and fewer than 5 labeled cases stops before training with one
      line saying what to do (nnU-Net's 5-fold split would fail inside scikit-learn);
    - ``val`` cases of the split (preprocessed into the configuration folder for fold 0's validation) are never
      training cases: fold ``all`` leaves them out, and without ``splits_final.json`` (which
      ``nnssl_plan_and_preprocess`` writes for them) a numbered fold stops instead of cross-validating over them.

    ``SystemExit`` with a message makes ``nnUNetv2_train`` print that message and exit 1, without a traceback.
    """

    def _ssl_val_ids(self) -> set[str]:
        import json

        path = os.path.join(self.preprocessed_dataset_folder_base, "ssl_split.json")
        try:
            val = json.loads(open(path).read()).get("val", [])
        except (OSError, ValueError, AttributeError):
            return set()
        return set(val) if isinstance(val, list) else set()

    def do_split(self):
        val_ids = self._ssl_val_ids()
        if self.fold == "all":
            tr_keys, _ = super().do_split()
            if val_ids:
                tr_keys = [k for k in tr_keys if k not in val_ids]
                self.print_to_log_file(f"fold 'all': the {len(val_ids)} 'val' cases of ssl_split.json are left out "
                                       f"of training; training on {len(tr_keys)} labeled cases")
            return tr_keys, tr_keys
        splits_file = os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if not os.path.isfile(splits_file):
            if self.dataset_class is None:
                self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
            keys = [k for k in self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
                    if k not in val_ids]
            name = self.plans_manager.dataset_name
            if val_ids:
                dataset_id = name.split("_")[0][len("Dataset"):].lstrip("0") or "0"
                raise SystemExit(f"{splits_file} is missing but ssl_split.json has 'val' cases: run "
                                 f"nnssl_plan_and_preprocess -d {dataset_id}, which writes it (fold 0 = train on the "
                                 f"labeled cases, validate on 'val')")
            if len(keys) < MIN_CASES_FOR_CROSS_VALIDATION:
                raise SystemExit(
                    f"fold {self.fold}: {name} has only {len(keys)} labeled case(s) and nnU-Net's 5-fold "
                    f"cross-validation needs at least {MIN_CASES_FOR_CROSS_VALIDATION}. Train on all labeled cases "
                    f"with fold 'all' (nnUNetv2_train {name} {self.configuration_name} all -tr "
                    f"{type(self).__name__}), or write your own folds to {splits_file} "
                    f"([{{\"train\": [...], \"val\": [...]}}, ...]), or add a 'val' list to ssl_split.json "
                    f"and rerun nnssl_plan_and_preprocess")
        return super().do_split()


class ScheduleFromEnvironment(FoldsFromSplitFile, IterationTimer):
    """Mixin: ``NNSSL_NUM_EPOCHS``, ``NNSSL_ITERATIONS_PER_EPOCH``, ``NNSSL_VAL_ITERATIONS_PER_EPOCH`` and
    ``NNSSL_SAVE_EVERY`` override the schedule at ``initialize()`` (after every subclass ``__init__`` has set
    its own defaults and before the lr scheduler is built from ``num_epochs``).

    ``NNSSL_INITIAL_LR`` replaces nnU-Net's initial learning rate (0.01, SGD with poly decay) of trainers that use
    nnU-Net's optimiser (``uses_nnunet_optimizer``); trainers with a paper-specific optimiser (the pseudo-label
    fine-tuning's Adam 5e-5, SDCL's ``_adam``) keep theirs and log that the variable was ignored.

    ``NNSSL_SKIP_FINAL_VALIDATION=1`` skips the sliding-window prediction of the validation cases after training
    (``nnUNetv2_train --val`` can still run it later): ``nnssl_benchmark`` scores the test set instead, and on a
    CPU this prediction costs as much as a short schedule."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get(ENV_SKIP_FINAL_VALIDATION, "") not in ("", "0"):
            self.print_to_log_file(f"{ENV_SKIP_FINAL_VALIDATION} is set: final validation skipped")
            return
        super().perform_actual_validation(save_probabilities)

    uses_nnunet_optimizer: bool = True

    def apply_schedule_from_environment(self) -> None:
        lr = os.environ.get(ENV_INITIAL_LR, "")
        if lr:
            try:
                value = float(lr)
            except ValueError:
                raise ValueError(f"environment variable {ENV_INITIAL_LR}={lr!r} must be a positive number") from None
            if not value > 0:
                raise ValueError(f"environment variable {ENV_INITIAL_LR}={lr!r} must be a positive number")
            if self.uses_nnunet_optimizer:
                self.initial_lr = value
                self.print_to_log_file(f"{ENV_INITIAL_LR}={lr}: initial_lr set to {value}")
            else:
                self.print_to_log_file(f"{ENV_INITIAL_LR}={lr} ignored: this trainer keeps its own optimiser "
                                       f"(initial_lr {self.initial_lr})")
        for env, attr in ((ENV_NUM_EPOCHS, "num_epochs"), (ENV_ITERATIONS, "num_iterations_per_epoch"),
                          (ENV_VAL_ITERATIONS, "num_val_iterations_per_epoch"), (ENV_SAVE_EVERY, "save_every")):
            value = _env_int(env)
            if value is not None:
                setattr(self, attr, value)
                self.print_to_log_file(f"{env}={value}: {attr} set to {value}")

    def initialize(self):
        if not self.was_initialized:
            self.apply_schedule_from_environment()
        super().initialize()


class nnUNetTrainerSupervised(ScheduleFromEnvironment, nnUNetTrainer):
    """Plain nnUNetTrainer on the labeled cases, with the nnssl schedule overrides: the baseline every SSL
    trainer is compared with (same labeled cases, same iterations)."""


class JointBatchLoader:
    """Draws one labeled and one unlabeled batch per ``next()``; both come from nnU-Net's background workers."""

    def __init__(self, labeled, unlabeled):
        self.labeled = labeled
        self.unlabeled = unlabeled

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.labeled)
        unlabeled = next(self.unlabeled)
        batch["unlabeled_data"] = unlabeled["data"]
        batch["unlabeled_keys"] = unlabeled["keys"]
        return batch

    def _finish(self):
        for loader in (self.labeled, self.unlabeled):
            if hasattr(loader, "_finish"):
                loader._finish()


class nnUNetTrainerSSLBase(ScheduleFromEnvironment, nnUNetTrainer):
    """Base of the semi-supervised trainers. Subclasses override ``build_extra_networks`` and ``train_step``.

    Batch sizes: ``labeled_batch_size`` / ``unlabeled_batch_size`` (class attributes or the environment variables
    ``NNSSL_LABELED_BATCH_SIZE`` / ``NNSSL_UNLABELED_BATCH_SIZE``); ``None`` means nnU-Net's planned batch size.
    Under DDP both are global and split across ranks as nnU-Net splits its own; every rank draws its own
    unlabeled samples (the augmenter workers of each rank are seeded independently, as for labeled data).
    """

    labeled_batch_size: int | None = None
    unlabeled_batch_size: int | None = None
    # full nnU-Net schedules reach the papers' absolute ramp length (30 000 iterations: SSL4MIS iter//150 with
    # length 200); short schedules would otherwise never reach the full weight, so the ramp is capped at this
    # fraction of the whole schedule.
    rampup_iterations: int = 30000
    max_rampup_fraction: float = 0.4
    # unlabeled cases whose withheld labels (labelsUnlabeled) score the pseudo-labels each epoch (diagnostic)
    diagnostic_cases: int = 4
    # the pseudo-label confidence above which a voxel counts as confident in the ``fraction_above_threshold``
    # diagnostic; a method with its own confidence threshold sets it to that value
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.extra_networks: dict[str, nn.Module] = {}
        self.extra_optimizers: dict[str, torch.optim.Optimizer] = {}
        self.extra_lr_schedulers: dict[str, Any] = {}
        self.global_iteration = 0
        self.ssl_log: dict[str, list[float]] = {}
        self.unlabeled_batch_size_per_rank: int | None = None

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.was_initialized:
            return
        super().initialize()
        self._set_ssl_batch_sizes()
        self.build_extra_networks()

    def _set_ssl_batch_sizes(self) -> None:
        world = dist.get_world_size() if self.is_ddp else 1
        labeled = _env_int(ENV_LABELED_BS) or self.labeled_batch_size
        if labeled is not None:
            self.batch_size = max(1, round(labeled / world))
        unlabeled = _env_int(ENV_UNLABELED_BS) or self.unlabeled_batch_size
        self.unlabeled_batch_size_per_rank = max(1, round(unlabeled / world)) if unlabeled else self.batch_size
        self.print_to_log_file(f"batch per rank: {self.batch_size} labeled + {self.unlabeled_batch_size_per_rank} "
                               f"unlabeled; fraction_above_threshold counts pseudo-label confidence >= "
                               f"{self.confidence_threshold}")

    def build_extra_networks(self) -> None:
        """Hook: create extra networks with ``register_extra_network``. The default adds none."""

    def new_network(self, seed: int | None = None, deep_supervision: bool | None = None) -> nn.Module:
        """Another instance of this configuration's architecture on the device (optionally seeded init)."""
        ds = self.enable_deep_supervision if deep_supervision is None else deep_supervision
        state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        net = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                              self.num_input_channels, self.label_manager.num_segmentation_heads,
                                              ds).to(self.device)
        if seed is not None:
            torch.random.set_rng_state(state)
        return net

    def register_extra_network(self, name: str, network: nn.Module, trainable: bool) -> nn.Module:
        """Make ``network`` part of the trainer's state. Trainable ones get an optimizer and lr scheduler from
        this trainer's own ``configure_optimizers`` and are compiled / DDP-wrapped like ``self.network``."""
        if name in self.extra_networks:
            raise ValueError(f"extra network '{name}' registered twice")
        if trainable:
            saved = self.network
            self.network = network  # reuse configure_optimizers (SGD/Adam, poly lr) of whatever trainer this is
            try:
                optimizer, scheduler = self.configure_optimizers()
            finally:
                self.network = saved
            self.extra_optimizers[name] = optimizer
            self.extra_lr_schedulers[name] = scheduler
            if self._do_i_compile():
                network = torch.compile(network)
            if self.is_ddp:
                network = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(network), device_ids=[self.local_rank])
        else:
            for p in network.parameters():
                p.requires_grad_(False)
        self.extra_networks[name] = network
        return network

    # ------------------------------------------------------------------ data
    def get_dataloaders(self):
        labeled, val = super().get_dataloaders()
        return JointBatchLoader(labeled, self.get_unlabeled_dataloader()), val

    def unlabeled_identifiers(self) -> list[str]:
        folder = unlabeled_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        cases = completed_cases(folder)
        if not cases:
            # a user error: SystemExit makes nnUNetv2_train print this line and exit 1, without a traceback
            raise SystemExit(
                f"No preprocessed unlabeled cases in {folder}: run nnssl_plan_and_preprocess -d "
                f"{self.plans_manager.dataset_name} -c {self.configuration_name} (or, if nnU-Net's preprocessing is "
                f"already done: nnssl_preprocess_unlabeled -d {self.plans_manager.dataset_name} -c "
                f"{self.configuration_name})")
        return cases

    def get_unlabeled_dataloader(self):
        folder = unlabeled_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        dataset = nnUNetDatasetBlosc2(str(folder), self.unlabeled_identifiers())
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # the labeled pipeline without deep-supervision target downsampling: the 'segmentation' of an unlabeled
        # case is only its nonzero mask and is dropped after augmentation
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)
        loader = nnUNetDataLoader(dataset, self.unlabeled_batch_size_per_rank, initial_patch_size,
                                  self.configuration_manager.patch_size, self.label_manager,
                                  oversample_foreground_percent=0.0, transforms=transforms)
        loader.has_ignore = False  # no annotation at all: crops are uniformly random
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, num_processes=max(1, n_proc // 2),
                                            num_cached=max(3, n_proc // 2), seeds=None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    # ------------------------------------------------------------------ training helpers
    def autocast(self):
        """nnU-Net's mixed-precision context: autocast on CUDA only."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor], torch.Tensor]:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        unlabeled = batch["unlabeled_data"].to(self.device, non_blocking=True)
        return data, target, unlabeled

    def all_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, *self.extra_optimizers.values()]

    def trainable_networks(self) -> list[nn.Module]:
        return [self.network, *(self.extra_networks[n] for n in self.extra_optimizers)]

    def zero_grad(self) -> None:
        for opt in self.all_optimizers():
            opt.zero_grad(set_to_none=True)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward through every trainable network, clip each to norm 12 and step each optimizer, with one
        GradScaler for all of them on CUDA (as nnU-Net does for its single network)."""
        pairs = list(zip(self.trainable_networks(), self.all_optimizers()))
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            for net, opt in pairs:
                self.grad_scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            for _, opt in pairs:
                self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            for net, opt in pairs:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
                opt.step()

    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def rampup_length(self) -> int:
        return int(max(1, min(self.rampup_iterations, self.max_rampup_fraction * self.total_iterations())))

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(enabled)
        for name in self.extra_optimizers:
            net = unwrap(self.extra_networks[name])
            if hasattr(net, "set_deep_supervision"):  # composite extras (decoder sets, network pairs)
                net.set_deep_supervision(enabled)
            elif hasattr(net, "decoder"):
                net.decoder.deep_supervision = enabled

    # ------------------------------------------------------------------ loop hooks
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        for name, net in self.extra_networks.items():
            net.train()
        for scheduler in self.extra_lr_schedulers.values():
            scheduler.step(self.current_epoch)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        extras = sorted({k for out in train_outputs for k in out if k != "loss"})
        values = {}
        for key in extras:
            vals = [float(out[key]) for out in train_outputs if key in out]
            value = float(np.nanmean(vals)) if vals else float("nan")
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, value)
                value = float(np.nanmean(gathered))
            values[key] = value
        self._log_ssl(values)

    def _log_ssl(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            series = self.ssl_log.setdefault(key, [])
            series.extend([float("nan")] * (self.current_epoch - len(series)))
            series[self.current_epoch:] = [value]
        if values:
            self.print_to_log_file("ssl: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def confidence_stats(self, *logits: torch.Tensor) -> torch.Tensor:
        """``[mean confidence, fraction_above_threshold]`` of the pseudo-labels of each logits tensor, averaged
        over the tensors (e.g. the two networks of CPS); see :func:`nnssl.diagnostics.pseudo_label_confidence_stats`.
        """
        return torch.stack([pseudo_label_confidence_stats(z, self.confidence_threshold, self.label_manager.has_regions)
                            for z in logits]).mean(0)

    def pseudo_label_network(self) -> nn.Module:
        """The network whose argmax is the method's pseudo-label (for diagnostics); default the inference one."""
        return self.network

    @torch.no_grad()
    def pseudo_label_quality(self) -> dict[str, float]:
        """Dice of the pseudo-labels against the withheld labels of a few unlabeled cases (central patch each).

        Only when the dataset has ``labelsUnlabeled`` (a simulated labeled fraction); the labels are read here,
        after the epoch's training, and nowhere else.
        """
        base, ident = self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier
        folder = withheld_labels_folder(base, ident)
        if self.label_manager.has_regions or not folder.is_dir():
            return {}
        import blosc2
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

        cases = sorted(p.stem for p in folder.glob("*.npy"))[: self.diagnostic_cases]
        net = unwrap(self.pseudo_label_network())
        was_training = net.training
        net.eval()
        patch = list(self.configuration_manager.patch_size)
        labels = self.label_manager.foreground_labels
        counts = np.zeros((len(labels), 3))  # tp, fp, fn
        for case in cases:
            data = blosc2.open(str(unlabeled_folder(base, ident) / f"{case}.b2nd"), mode="r")[:]
            label = np.load(folder / f"{case}.npy")
            if len(patch) == 2:  # 2d configuration: the central slice
                data, label = data[:, data.shape[1] // 2], label[:, label.shape[1] // 2]
            bbox = [[(s - p) // 2, (s - p) // 2 + p] for s, p in zip(data.shape[1:], patch)]
            x = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(data, bbox, 0))).float()[None]
            y = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(label, bbox, -1)))[0].to(self.device)
            with self.autocast():
                out = net(x.to(self.device))
            pred = (out[0] if isinstance(out, (list, tuple)) else out)[0].argmax(0)
            valid = y >= 0
            for i, c in enumerate(labels):
                p, t = (pred == c) & valid, (y == c) & valid
                counts[i] += [(p & t).sum().item(), (p & ~t).sum().item(), (~p & t).sum().item()]
        net.train(was_training)
        denom = 2 * counts[:, 0] + counts[:, 1] + counts[:, 2]
        dice = np.where(denom > 0, 2 * counts[:, 0] / np.maximum(denom, 1), np.nan)
        return {"pseudo_label_dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")}

    def on_epoch_end(self):
        if self.local_rank == 0:
            self._log_ssl(self.pseudo_label_quality())
        if self.local_rank == 0 and self.ssl_log:
            from nnssl.diagnostics import plot_ssl_progress, save_ssl_progress

            save_ssl_progress(self.ssl_log, join(self.output_folder, "ssl_progress.json"))
            plot_ssl_progress(self.ssl_log, join(self.output_folder, "ssl_progress.png"))
        super().on_epoch_end()

    def on_train_end(self):
        if isinstance(self.dataloader_train, JointBatchLoader):
            self.dataloader_train._finish()
            self.dataloader_train = None
        super().on_train_end()

    # ------------------------------------------------------------------ checkpoints
    def ssl_state_dict(self) -> dict:
        """Everything beyond nnU-Net's own checkpoint; subclasses extend it (class statistics, GMM state...)."""
        return {
            "extra_networks": {n: unwrap(m).state_dict() for n, m in self.extra_networks.items()},
            "extra_optimizers": {n: o.state_dict() for n, o in self.extra_optimizers.items()},
            "global_iteration": self.global_iteration,
            "ssl_log": self.ssl_log,
        }

    def load_ssl_state_dict(self, state: dict) -> None:
        missing = set(self.extra_networks) - set(state["extra_networks"])
        if missing:
            raise RuntimeError(f"checkpoint has no state for extra network(s) {sorted(missing)}")
        for name, net in self.extra_networks.items():
            unwrap(net).load_state_dict(state["extra_networks"][name])
        for name, opt in self.extra_optimizers.items():
            opt.load_state_dict(state["extra_optimizers"][name])
        self.global_iteration = int(state["global_iteration"])
        self.ssl_log = {k: list(v) for k, v in state.get("ssl_log", {}).items()}

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net builds and writes its checkpoint dict inside one method with no hook for extra keys, so the
        # file it writes (to a temporary name) is read back, completed and moved into place atomically: a job
        # killed while saving never leaves a truncated checkpoint_latest.pth behind.
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        tmp = f"{filename}.nnssl_tmp"
        super().save_checkpoint(tmp)
        checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
        checkpoint["nnssl_state"] = self.ssl_state_dict()
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        if "nnssl_state" not in checkpoint:
            raise RuntimeError(f"{filename_or_checkpoint} has no nnssl state (teacher, second network, statistics):"
                               f" it was not written by an nnssl trainer")
        self.load_ssl_state_dict(checkpoint["nnssl_state"])
