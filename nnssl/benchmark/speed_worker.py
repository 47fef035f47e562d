"""The subprocess of ``nnssl_speed`` (:mod:`nnssl.benchmark.speed`): one trainer, or the floor's pass kinds, in a
fresh process (its own peak memory and global state).

``python -m nnssl.benchmark.speed_worker trainer NAME -d D -c C -f F -device DEV --warmup W --iterations N OUT.json``
builds ``NAME`` as ``nnUNetv2_train`` does (nnU-Net's ``get_trainer_from_args``: plans and dataset.json from
``nnUNet_preprocessed``, the plans' patch, batch and network), runs ``on_train_start()`` (dataloaders, AMP scaler,
torch.compile as nnU-Net decides), moves to the middle of the schedule (epoch ``num_epochs // 2``: every method in its
main stage, e.g. SDCL's self-training) and ``on_train_epoch_start()``, then times ``W + N`` steps::

    t0; batch = next(trainer.dataloader_train); t1; trainer.train_step(batch); t2     wait = t1 - t0, step = t2 - t0

(``train_step`` returns host values, so the device's work is finished at ``t2``), counts the network passes of the
last warm-up step with forward hooks (:class:`PassCounter`), reads the peak memory, counts the FLOPs of one more step
(:func:`step_flops`; not for a compiled trainer) and calls ``on_train_end()`` (checkpointing disabled, as
``nnUNetv2_train --disable_checkpointing``).

``... floor -d D -c C -f F -device DEV --warmup W --iterations N --kinds ROWS:BACKWARD ... OUT.json`` builds
nnU-Net's own ``nnUNetTrainer`` the same way (its network, compile decision and GradScaler) and times, per kind,
``zero_grad``, the forward of ``ROWS`` random patches under nnU-Net's autocast and (``BACKWARD`` = 1) the backward of
the sum of the outputs' means; no loss function, no optimizer step; and counts one such pass's FLOPs.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from statistics import median

import torch
from torch import nn

from nnssl.benchmark.speed import resolve_passes


def first_tensor(obj) -> torch.Tensor | None:
    """The first tensor in ``obj`` (a tensor, or nested lists / tuples / dicts of them), else None."""
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


class PassCounter:
    """Records every call of the given modules: ``(name, rows, autograd on)``, rows = the first input tensor's batch
    size. Forward pre-hooks on the modules as the trainer holds them (compiled or DDP wrappers included); use
    :meth:`counting` around the code to observe."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.passes: list[tuple[str, int, bool]] = []

    @contextmanager
    def counting(self):
        handles = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            tensor = first_tensor(args) if args else first_tensor(kwargs)
            self.passes.append((name, int(tensor.shape[0]) if tensor is not None else 0, torch.is_grad_enabled()))

        return hook

    def as_records(self) -> list[dict]:
        return [{"network": n, "rows": r, "backward": g} for n, r, g in self.passes]


def trainer_modules(trainer) -> dict[str, nn.Module]:
    """The registered networks of a trainer: ``network`` and every extra network (nnssl trainers)."""
    return {"network": trainer.network, **getattr(trainer, "extra_networks", {})}


def passes_of(trainer_class: type) -> tuple | None:
    """The passes a trainer class declares; nnU-Net's own trainers (no ``network_passes``, not an nnssl SSL trainer)
    make nnU-Net's step, one forward + backward of the labeled batch; an SSL trainer that declares none: None."""
    from nnssl.training.base import nnUNetTrainerSSLBase
    from nnssl.training.passes import SUPERVISED_PASSES, check_passes, declared_passes

    passes = declared_passes(trainer_class)
    if passes is None:
        return None if issubclass(trainer_class, nnUNetTrainerSSLBase) else SUPERVISED_PASSES
    return check_passes(passes, f"{trainer_class.__name__}.network_passes")


def _device(name: str, threads: int | None = None) -> torch.device:
    """The device, with torch's threads as ``nnUNetv2_train -device cpu / cuda`` sets them (CPU: every core, unless
    ``threads`` says otherwise: on a shared machine two spinning threads on two busy cores can be 100x slower)."""
    import multiprocessing

    if name == "cpu":
        torch.set_num_threads(threads or multiprocessing.cpu_count())
        return torch.device("cpu")
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    return torch.device(name)


def build_trainer(name: str, dataset: str, configuration: str, fold: str, device: torch.device):
    from nnunetv2.run.run_training import get_trainer_from_args
    from torch.backends import cudnn

    trainer = get_trainer_from_args(dataset, configuration, int(fold) if fold != "all" else fold, name,
                                    device=device)
    trainer.disable_checkpointing = True
    if torch.cuda.is_available():
        cudnn.deterministic = False
        cudnn.benchmark = True
    return trainer


def counted_flops(fn) -> float:
    """The convolution / matrix-product FLOPs (forward and backward) torch's ``FlopCounterMode`` counts in ``fn()``;
    elementwise operations and reductions count 0, as in that counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def step_flops(trainer) -> float | None:
    """FLOPs of one more ``train_step`` on the next batch; None for a compiled trainer (its kernels bypass the
    counter). Runs after the timed steps: counting slows the step down."""
    if trainer._do_i_compile():
        return None
    batch = next(trainer.dataloader_train)
    return counted_flops(lambda: trainer.train_step(batch))


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "RSS"


def measure_trainer(name: str, dataset: str, configuration: str, fold: str, device_name: str, warmup: int,
                    iterations: int, threads: int | None = None) -> dict:
    device = _device(device_name, threads)
    trainer = build_trainer(name, dataset, configuration, fold, device)
    trainer.on_train_start()
    try:
        trainer.current_epoch = trainer.num_epochs // 2
        if hasattr(trainer, "global_iteration"):
            trainer.global_iteration = trainer.current_epoch * trainer.num_iterations_per_epoch
        trainer.on_train_epoch_start()
        counter = PassCounter(trainer_modules(trainer))
        waits, steps = [], []
        for i in range(warmup + iterations):
            count = i == max(warmup, 1) - 1
            with counter.counting() if count else _nothing():
                t0 = time.perf_counter()
                batch = next(trainer.dataloader_train)
                t1 = time.perf_counter()
                trainer.train_step(batch)
                t2 = time.perf_counter()
            if i >= warmup:
                waits.append(t1 - t0)
                steps.append(t2 - t0)
        memory, memory_kind = peak_memory(device)
        flops = step_flops(trainer)
        n_labeled, n_unlabeled = int(trainer.batch_size), int(getattr(trainer, "unlabeled_batch_size_per_rank", 0) or 0)
        passes = passes_of(type(trainer))
        return {"trainer": name, "seconds_per_iteration": median(steps), "wait_seconds": waits, "step_seconds": steps,
                "peak_memory_mb": memory, "memory_kind": memory_kind, "counted_passes": counter.as_records(),
                "declared_passes": resolve_passes(passes, n_labeled, n_unlabeled) if passes else [],
                "labeled_batch": n_labeled, "unlabeled_batch": n_unlabeled,
                "patch": [int(s) for s in trainer.configuration_manager.patch_size], "device": str(device),
                "compiled": bool(trainer._do_i_compile()), "epoch": trainer.current_epoch, "step_flops": flops}
    finally:
        trainer.on_train_end()


@contextmanager
def _nothing():
    yield


def measure_floor(dataset: str, configuration: str, fold: str, device_name: str, warmup: int, iterations: int,
                  kinds: list[tuple[int, bool]], threads: int | None = None) -> dict:
    device = _device(device_name, threads)
    trainer = build_trainer("nnUNetTrainer", dataset, configuration, fold, device)
    trainer.initialize()
    network = trainer.network
    network.train()
    patch = [int(s) for s in trainer.configuration_manager.patch_size]
    results, flops = {}, {}
    for rows, backward in kinds:
        x = torch.randn(rows, trainer.num_input_channels, *patch, device=device)

        def one_pass():
            trainer.optimizer.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(backward), trainer_autocast(device):
                outputs = network(x)
                loss = sum(o.float().mean() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs]))
            if backward:
                (trainer.grad_scaler.scale(loss) if trainer.grad_scaler is not None else loss).backward()
            loss.item()  # the host waits for the device, as train_step's returned loss does

        times = []
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            one_pass()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        results[f"{rows}:{int(backward)}"] = median(times)
        if not trainer._do_i_compile():
            flops[f"{rows}:{int(backward)}"] = counted_flops(one_pass)
    memory, memory_kind = peak_memory(device)
    return {"seconds": results, "flops": flops, "patch": patch, "compiled": bool(trainer._do_i_compile()),
            "device": str(device), "peak_memory_mb": memory, "memory_kind": memory_kind}


def trainer_autocast(device: torch.device):
    """nnU-Net's train_step context: autocast on CUDA, nothing elsewhere."""
    from nnunetv2.utilities.helpers import dummy_context

    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else dummy_context()


def parse_kind(text: str) -> tuple[int, bool]:
    rows, _, backward = text.partition(":")
    return int(rows), backward == "1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnssl.benchmark.speed_worker")
    parser.add_argument("mode", choices=("trainer", "floor"))
    parser.add_argument("out")
    parser.add_argument("--trainer", default=None)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", required=True)
    parser.add_argument("-f", default="0")
    parser.add_argument("-device", default="cuda")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--kinds", nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.mode == "trainer":
            record = measure_trainer(args.trainer, args.d, args.c, args.f, args.device, args.warmup, args.iterations,
                                     args.threads)
        else:
            record = measure_floor(args.d, args.c, args.f, args.device, args.warmup, args.iterations,
                                   [parse_kind(k) for k in args.kinds], args.threads)
        record["error"] = None
    except (Exception, SystemExit) as error:  # noqa: BLE001 - the row records it; the command goes on
        lines = traceback.format_exc().strip().splitlines()
        message = " ".join(str(error).split()) or type(error).__name__
        record = {"error": f"{type(error).__name__}: {message}"[:500], "traceback": "\n".join(lines[-30:])}
        print("\n".join(lines[-30:]), file=sys.stderr)
    out.write_text(json.dumps(record), encoding="utf-8")
    sys.exit(0 if record["error"] is None else 1)


if __name__ == "__main__":
    main()
