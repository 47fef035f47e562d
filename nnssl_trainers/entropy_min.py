import torch

from nnssl.losses.entropy import softmax_entropy
from nnssl.tensors import as_list
from nnssl.training.base import nnUNetTrainerSSLBase
from nnssl.training.passes import ONE_NETWORK_PASSES
from nnssl.training.step import SSLTerms


class nnUNetTrainerEntropyMin(nnUNetTrainerSSLBase):
    """Entropy minimisation (Grandvalet & Bengio, NeurIPS 2004, Eq. 7), the worked example of README "Add a method"::

        L = DC+CE(f(x_l), y) + w(t) · mean_v H(softmax f(x_u)),   H(p) = -Σ_k p_k log p_k
        w(t) = 0.1 · sigmoid_rampup(t, L)     (the base's default ramp)

    One network (``self.network``, used for inference); the labeled and unlabeled patches go through it as one batch.
    """

    unsupervised_weight = 0.1
    log_prefix = "entmin"
    network_passes = ONE_NETWORK_PASSES
    supports_regions = False
    unsupported_reason = "the entropy of a softmax needs mutually exclusive classes"

    def ssl_terms(self, data: torch.Tensor, target, unlabeled: torch.Tensor) -> SSLTerms:
        n_l = data.shape[0]
        outputs = as_list(self.network(torch.cat((data, unlabeled))))
        logits_u = outputs[0][n_l:]
        return SSLTerms(self.supervised_loss(outputs, target, n_l), softmax_entropy(logits_u),
                        pseudo_label_logits=(logits_u,))
