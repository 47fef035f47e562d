"""``nnUNetTrainerSSLBase``: the base every nnssl semi-supervised trainer builds on.

It keeps nnU-Net's training loop, labeled loader, augmentation, deep supervision, mixed precision, torch.compile and
DDP as they are, and owns what every method shares:

- the unlabeled stream (:mod:`nnssl.training.unlabeled_data`): ``train_step`` receives one batch
  ``{'data', 'target', 'keys', 'unlabeled_data', 'unlabeled_keys'}``;
- extra networks as state: an EMA teacher (``teacher_ema_decay``) and a second trainable network
  (``second_network``) are declared by class attributes; anything else is registered in ``build_extra_networks``.
  Trainable extras get their own optimizer and lr scheduler, are compiled / DDP-wrapped like ``self.network``, and
  all of them are saved in every checkpoint and restored by ``--c``; ``network_weights`` is always
  ``self.network``, the model ``nnUNetv2_predict`` uses;
- the training step (template method): device transfer, ``zero_grad``, autocast, the method's terms (hook
  :meth:`ssl_terms`), ``loss = L_sup + w(t) L_unsup``, backward and step of every optimizer with one GradScaler and
  clipping, EMA update, iteration count, and one host synchronisation for the logged scalars
  (:mod:`nnssl.training.step`);
- the weight schedule ``w(t)`` (:meth:`weight_schedule`, a :class:`nnssl.ramps.ConsistencyWeight`);
- capability checks (regions, ignore label, cascade) once, with one error;
- per-epoch SSL log (``ssl_progress.json`` / ``.png``) and the pseudo-label Dice against withheld labels;
- extra state (class statistics, GMMs...) registered once with :meth:`register_state` and restored by ``--c``.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnssl.diagnostics import DEFAULT_CONFIDENCE_THRESHOLD
from nnssl.ema import make_ema_teacher, update_ema_
from nnssl.network_pair import xavier_normal_init_
from nnssl.preprocessing.unlabeled import unlabeled_folder, withheld_labels_folder
from nnssl.ramps import ConsistencyWeight
from nnssl.tensors import labeled_rows, unwrap
from nnssl.training.environment import ENV_LABELED_BS, ENV_UNLABELED_BS, ScheduleFromEnvironment, env_int
from nnssl.training.pseudo_label_quality import pseudo_label_dice
from nnssl.training.ssl_log import SSLLogger
from nnssl.training.step import SSLTerms, step_log
from nnssl.training.unlabeled_data import JointBatchLoader, augmentation_workers, n_proc_da, unlabeled_dataloader
from nnssl.validation import trusted_inputs


class UnsupportedByTrainer(SystemExit):
    """A dataset or configuration this trainer cannot train (regions, ignore label, cascade). A ``SystemExit``
    with its message: ``nnUNetv2_train`` prints the one line and exits 1, without a traceback."""


class StateDict(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


class nnUNetTrainerSSLBase(ScheduleFromEnvironment, nnUNetTrainer):
    """Base of the semi-supervised trainers: a method declares its networks and weight, and implements
    :meth:`ssl_terms`.

    Batch sizes: ``labeled_batch_size`` / ``unlabeled_batch_size`` (class attributes or the environment variables
    ``NNSSL_LABELED_BATCH_SIZE`` / ``NNSSL_UNLABELED_BATCH_SIZE``); ``None`` means nnU-Net's planned batch size.
    Under DDP both are global and split across ranks as nnU-Net splits its own; every rank draws its own
    unlabeled samples (the augmenter workers of each rank are seeded independently, as for labeled data).
    """

    labeled_batch_size: int | None = None
    unlabeled_batch_size: int | None = None
    # without an explicit unlabeled batch size: unlabeled patches per step = this many times the labeled ones
    # (FixMatch's mu; the semi-supervised segmentation codes use 1, i.e. 2 + 2 or 4 + 4)
    unlabeled_batch_factor: int = 1
    # λ, the maximum weight of the unsupervised term (the paper's value); the ramp is weight_schedule()
    unsupervised_weight: float = 0.1
    # full nnU-Net schedules reach the papers' absolute ramp length (30 000 iterations: SSL4MIS iter//150 with
    # length 200); short schedules would otherwise never reach the full weight, so the ramp is capped at this
    # fraction of the whole schedule.
    rampup_iterations: int = 30000
    max_rampup_fraction: float = 0.4
    # declared networks: an EMA teacher of self.network ("teacher", decay as given; None: no teacher) and a second
    # trainable network of the same architecture ("network2"; "kaiming": nnU-Net's init, another random draw;
    # "xavier": xavier-normal, norm weight 1 / bias 0 as SSL4MIS and DHC re-initialise CPS's second network)
    teacher_ema_decay: float | None = None
    second_network: str | None = None
    # prefix of the method's own logged scalars
    log_prefix: str = "ssl"
    # capabilities, checked once at construction (reason: why not, for the message)
    supports_regions: bool = True
    supports_ignore_label: bool = True
    supports_cascade: bool = False
    unsupported_reason: str = ""
    # unlabeled cases whose withheld labels (labelsUnlabeled) score the pseudo-labels each epoch (diagnostic)
    diagnostic_cases: int = 4
    # the pseudo-label confidence above which a voxel counts as confident in the ``fraction_above_threshold``
    # diagnostic; a method with its own confidence threshold sets it to that value
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    # names of extra networks in checkpoints written by older nnssl versions -> their name now
    legacy_network_names: dict[str, str] = {}
    # registered state that checkpoints of older nnssl versions kept beside ``extra_state`` (same layout)
    legacy_state_names: tuple[str, ...] = ()
    # registered state whose older checkpoints kept its entries as several top-level keys -> those keys
    legacy_state_groups: dict[str, tuple[str, ...]] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.check_capabilities()
        self.extra_networks: dict[str, nn.Module] = {}
        self.extra_optimizers: dict[str, torch.optim.Optimizer] = {}
        self.extra_lr_schedulers: dict[str, Any] = {}
        self.extra_state: dict[str, StateDict] = {}
        self.global_iteration = 0
        self.ssl_logger = SSLLogger()
        self.unlabeled_batch_size_per_rank: int | None = None

    # ------------------------------------------------------------------ capabilities
    def check_capabilities(self) -> None:
        """Refuse, once and with one error type, what this trainer cannot train."""
        lm = self.label_manager
        for unsupported, what in ((lm.has_regions and not self.supports_regions, "region-based labels"),
                                  (lm.has_ignore_label and not self.supports_ignore_label, "an ignore label"),
                                  (self.is_cascaded and not self.supports_cascade, "a cascade configuration")):
            if unsupported:
                reason = f": {self.unsupported_reason}" if self.unsupported_reason else ""
                raise UnsupportedByTrainer(f"{type(self).__name__} does not support {what} "
                                           f"({self.plans_manager.dataset_name}, {self.configuration_name}){reason}")

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.was_initialized:
            return
        super().initialize()
        self._set_ssl_batch_sizes()
        self._build_declared_networks()
        self.build_extra_networks()

    def _set_ssl_batch_sizes(self) -> None:
        world = dist.get_world_size() if self.is_ddp else 1
        labeled = env_int(ENV_LABELED_BS) or self.labeled_batch_size
        if labeled is not None:
            self.batch_size = max(1, round(labeled / world))
        unlabeled = env_int(ENV_UNLABELED_BS) or self.unlabeled_batch_size
        if int(self.unlabeled_batch_factor) != self.unlabeled_batch_factor or self.unlabeled_batch_factor < 1:
            raise ValueError(f"unlabeled_batch_factor: must be a positive integer, got {self.unlabeled_batch_factor!r}")
        self.unlabeled_batch_size_per_rank = (max(1, round(unlabeled / world)) if unlabeled
                                              else self.batch_size * int(self.unlabeled_batch_factor))
        self.print_to_log_file(f"batch per rank: {self.batch_size} labeled + {self.unlabeled_batch_size_per_rank} "
                               f"unlabeled; fraction_above_threshold counts pseudo-label confidence >= "
                               f"{self.confidence_threshold}")

    def _build_declared_networks(self) -> None:
        if self.teacher_ema_decay is not None:
            teacher = make_ema_teacher(unwrap(self.network))
            teacher.decoder.deep_supervision = False  # the teacher's full-resolution output is all a method uses
            self.register_extra_network("teacher", teacher, trainable=False)
        if self.second_network is not None:
            if self.second_network not in ("kaiming", "xavier"):
                raise ValueError(f"{type(self).__name__}.second_network must be 'kaiming', 'xavier' or None, got "
                                 f"{self.second_network!r}")
            net = self.new_network()
            self.register_extra_network("network2", xavier_normal_init_(net) if self.second_network == "xavier"
                                        else net, trainable=True)

    def build_extra_networks(self) -> None:
        """Hook: networks beyond the declared ones, with ``register_extra_network``. The default adds none."""

    # None when not declared (never raise here: nnU-Net's _save_debug_information reads every attribute)
    @property
    def teacher(self) -> nn.Module | None:
        return self.extra_networks.get("teacher")

    @property
    def network2(self) -> nn.Module | None:
        return self.extra_networks.get("network2")

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

    def register_state(self, name: str, state: StateDict) -> StateDict:
        """Make ``state`` (anything with ``state_dict`` / ``load_state_dict``: class statistics, a GMM, a module)
        part of every checkpoint, restored by ``--c``."""
        if name in self.extra_state:
            raise ValueError(f"extra state '{name}' registered twice")
        self.extra_state[name] = state
        return state

    # ------------------------------------------------------------------ data
    def get_dataloaders(self):
        total = get_allowed_n_proc_DA()
        n_labeled, n_unlabeled = augmentation_workers(total, self.batch_size, self.unlabeled_batch_size_per_rank)
        self.print_to_log_file(f"augmentation workers (nnUNet_n_proc_DA = {total}): {n_labeled} labeled "
                               f"(validation: half of them) + {n_unlabeled} unlabeled")
        with n_proc_da(n_labeled):
            labeled, val = super().get_dataloaders()
        unlabeled = unlabeled_dataloader(self, self.unlabeled_batch_size_per_rank, n_unlabeled)
        return JointBatchLoader(labeled, unlabeled), val

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor], torch.Tensor]:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        unlabeled = batch["unlabeled_data"].to(self.device, non_blocking=True)
        return data, target, unlabeled

    # ------------------------------------------------------------------ the training step
    def autocast(self):
        """nnU-Net's mixed-precision context: autocast on CUDA only."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def rampup_length(self) -> int:
        return int(max(1, min(self.rampup_iterations, self.max_rampup_fraction * self.total_iterations())))

    def weight_schedule(self) -> ConsistencyWeight:
        """``w(t) = unsupervised_weight · sigmoid_rampup(t, rampup_length())``, ``t`` = iteration (evaluated every
        iteration, SSL4MIS's 30 000-iteration ramp capped at ``max_rampup_fraction`` of the schedule). Methods
        whose official ramp runs in other units override this."""
        return ConsistencyWeight(self.unsupervised_weight, self.rampup_length(), unit="iteration", iter_divisor=1)

    def current_unsupervised_weight(self) -> float:
        return self.weight_schedule()(self.global_iteration, self.current_epoch)

    def supervised_loss(self, outputs: list[torch.Tensor], target, n_labeled: int) -> torch.Tensor:
        """nnU-Net's loss (Dice + CE, deep supervision when enabled) on the labeled rows of ``outputs``."""
        labeled = labeled_rows(outputs, n_labeled)
        return self.loss(labeled if self.enable_deep_supervision else labeled[0], target)

    def deep_supervision_weights(self) -> tuple[float, ...]:
        """nnU-Net's deep-supervision weight of each output scale (highest resolution first); ``(1.0,)`` without."""
        factors = getattr(self.loss, "weight_factors", None) if self.enable_deep_supervision else None
        return tuple(float(w) for w in factors) if factors else (1.0,)

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        """Hook: the method's loss terms for one step, computed under autocast."""
        raise NotImplementedError(f"{type(self).__name__} must implement ssl_terms (or its own train_step)")

    def train_step(self, batch: dict) -> dict:
        data, target, unlabeled = self.to_device(batch)
        weight = self.current_unsupervised_weight()
        self.zero_grad()
        with self.autocast(), trusted_inputs():  # no value check (host sync) of the method functions in the step
            terms = self.ssl_terms(data, target, unlabeled)
            loss = terms.loss_supervised + weight * terms.loss_unsupervised if terms.loss is None else terms.loss
        self.backward_and_step(loss)
        self.after_optimizer_step()
        self.global_iteration += 1
        return step_log(loss, weight, terms, self.log_prefix, self.confidence_threshold,
                        self.label_manager.has_regions)

    def after_optimizer_step(self) -> None:
        """Hook after every optimizer step (before the iteration count moves on): the declared EMA teacher follows
        the student, ``alpha_t = min(1 - 1/(t+1), decay)`` (SSL4MIS)."""
        if self.teacher_ema_decay is not None:
            update_ema_(unwrap(self.teacher), unwrap(self.network), self.teacher_ema_decay, self.global_iteration)

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

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(enabled)
        for name in self.extra_optimizers:
            net = unwrap(self.extra_networks[name])
            if hasattr(net, "set_deep_supervision"):  # composite extras (decoder sets, network pairs)
                net.set_deep_supervision(enabled)
            elif hasattr(net, "decoder"):
                net.decoder.deep_supervision = enabled

    # ------------------------------------------------------------------ loop hooks and log
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        for net in self.extra_networks.values():
            net.train()
        for scheduler in self.extra_lr_schedulers.values():
            scheduler.step(self.current_epoch)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        self.log_ssl(SSLLogger.epoch_means(train_outputs, self.is_ddp))

    def log_ssl(self, values: dict[str, float]) -> None:
        self.ssl_logger.log_epoch(values, self.current_epoch)
        if values:
            self.print_to_log_file("ssl: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def pseudo_label_network(self) -> nn.Module:
        """The network whose argmax is the method's pseudo-label (for diagnostics): the teacher if declared,
        else the inference network."""
        return self.teacher if self.teacher_ema_decay is not None else self.network

    def pseudo_label_quality(self) -> dict[str, float]:
        """Dice of the pseudo-labels against the withheld labels of a few unlabeled cases (central patch each);
        see :func:`nnssl.training.pseudo_label_quality.pseudo_label_dice`."""
        if self.label_manager.has_regions:
            return {}
        base, ident = self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier
        return pseudo_label_dice(self.pseudo_label_network(), unlabeled_folder(base, ident),
                                 withheld_labels_folder(base, ident), self.configuration_manager.patch_size,
                                 self.label_manager.foreground_labels, self.device, self.diagnostic_cases,
                                 self.autocast)

    def on_epoch_end(self):
        if self.local_rank == 0:
            self.log_ssl(self.pseudo_label_quality())
            self.ssl_logger.save(self.output_folder)
        super().on_epoch_end()

    def on_train_end(self):
        if isinstance(self.dataloader_train, JointBatchLoader):
            self.dataloader_train._finish()
            self.dataloader_train = None
        super().on_train_end()

    # ------------------------------------------------------------------ checkpoints
    def ssl_state_dict(self) -> dict:
        """Everything beyond nnU-Net's own checkpoint: extra networks, their optimizers, registered state, the
        iteration count and the SSL log."""
        return {
            "extra_networks": {n: unwrap(m).state_dict() for n, m in self.extra_networks.items()},
            "extra_optimizers": {n: o.state_dict() for n, o in self.extra_optimizers.items()},
            "extra_state": {n: s.state_dict() for n, s in self.extra_state.items()},
            "global_iteration": self.global_iteration,
            "ssl_log": self.ssl_logger.get_checkpoint(),
        }

    def load_ssl_state_dict(self, state: dict) -> None:
        legacy = {k: state[k] for k in self.legacy_state_names if k in state}
        legacy.update({name: {k: state[k] for k in keys} for name, keys in self.legacy_state_groups.items()
                       if all(k in state for k in keys)})
        if legacy:  # written before the state was registered: it sat beside extra_state
            state = {**state, "extra_state": {**state.get("extra_state", {}), **legacy}}
        networks = {self.legacy_network_names.get(k, k): v for k, v in state["extra_networks"].items()}
        optimizers = {self.legacy_network_names.get(k, k): v for k, v in state["extra_optimizers"].items()}
        missing = set(self.extra_networks) - set(networks)
        missing_state = set(self.extra_state) - set(state.get("extra_state", {}))
        if missing or missing_state:
            raise RuntimeError(f"{type(self).__name__}: the checkpoint has no state for "
                               f"{sorted(missing | missing_state)}; it was written by another trainer or an "
                               f"incompatible nnssl version")
        for name, net in self.extra_networks.items():
            unwrap(net).load_state_dict(networks[name])
        for name, opt in self.extra_optimizers.items():
            opt.load_state_dict(optimizers[name])
        for name, obj in self.extra_state.items():
            obj.load_state_dict(state["extra_state"][name])
        self.global_iteration = int(state["global_iteration"])
        self.ssl_logger.load_checkpoint(state.get("ssl_log", {}))

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
