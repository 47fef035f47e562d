"""Where a trainer's step spends its time: torch.profiler over a few mid-schedule steps of a trainer built as
nnUNetv2_train builds it (``nnssl.benchmark.speed_worker.build_trainer``) on a planned dataset, one CPU thread; prints
the top operators by self time. For explaining a trainer's excess over its compute floor (nnssl_speed reports the
excess; this says where it goes).

Usage: ``python scripts/profile_trainer_step.py TRAINER DATASET CONFIG [STEPS]`` with nnUNet_* set
(``nnUNet_n_proc_DA=0``: the batches are drawn before profiling, so augmentation is not in the profile)."""

import sys

from torch.profiler import ProfilerActivity, profile, record_function

from nnssl.benchmark.speed_worker import _device, build_trainer

name, dataset, configuration = sys.argv[1:4]
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 5
device = _device("cpu", 1)
trainer = build_trainer(name, dataset, configuration, "0", device)
trainer.on_train_start()
trainer.current_epoch = trainer.num_epochs // 2
if hasattr(trainer, "global_iteration"):
    trainer.global_iteration = trainer.current_epoch * trainer.num_iterations_per_epoch
trainer.on_train_epoch_start()
batches = [next(trainer.dataloader_train) for _ in range(steps + 2)]
for b in batches[:2]:
    trainer.train_step(b)  # warm-up
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for b in batches[2:]:
        with record_function("step"):
            trainer.train_step(b)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
trainer.on_train_end()
