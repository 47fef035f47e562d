"""Compare two files of ``scripts/trainer_step_fingerprint.py``: the step losses and the largest weight difference
per network (0.0 everywhere = the change left the numbers unchanged)."""
import sys

import torch

a, b = (torch.load(p, weights_only=False) for p in sys.argv[1:3])
if a["weights"].keys() != b["weights"].keys():
    raise SystemExit(f"different networks: {sorted(a['weights'])} vs {sorted(b['weights'])}")
diffs = {net: max(float((a["weights"][net][k].float() - b["weights"][net][k].float()).abs().max())
                  for k in a["weights"][net]) for net in a["weights"]}
print(f"losses identical={a['losses'] == b['losses']} max|dw| per network={diffs}")
