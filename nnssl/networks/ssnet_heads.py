"""SS-Net's heads on the decoder features (Wu et al., MICCAI 2022; as DHC's ``VNet4SSNet`` in
``xmed-lab/DHC code/models/vnet.py`` builds them; docs/methods/ssnet.md)."""

from __future__ import annotations

from torch import Tensor, nn


def _mlp(in_features: int, out_features: int, nonlinearity: nn.Module, last: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nonlinearity,
                         nn.Linear(out_features, last))


class SSNetHeads(nn.Module):
    """The per-voxel heads SS-Net adds to a segmentation network, applied to feature vectors ``(M, C)``:

    - ``projection_head``: Linear(C, D) - BatchNorm1d - ReLU - Linear(D, D), ``D = 2C`` (DHC: ``n_filters * 2`` on
      the ``n_filters`` channels of the last decoder block); the memory stores its outputs;
    - ``prediction_head``: Linear(D, D) - BatchNorm1d - ReLU - Linear(D, D), on top of the projection (the features
      compared with the memory);
    - ``selectors[c]`` / ``memory_selectors[c]``: Linear(D, D) - BatchNorm1d - LeakyReLU(0.2) - Linear(D, 1), one per
      class (DHC: ``contrastive_class_selector_<c>`` / ``contrastive_class_selector_memory<c>``), the learned
      per-feature weights of the contrastive loss and the ranking of the memory update.
    """

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int | None = None):
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(f"SSNetHeads needs in_channels >= 1 and num_classes >= 2, got {in_channels}, "
                             f"{num_classes}")
        dim = 2 * in_channels if feature_dim is None else int(feature_dim)
        if dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim!r}")
        self.num_classes, self.feature_dim = int(num_classes), dim
        self.projection_head = _mlp(in_channels, dim, nn.ReLU(inplace=True), dim)
        self.prediction_head = _mlp(dim, dim, nn.ReLU(inplace=True), dim)
        self.selectors = nn.ModuleList(_mlp(dim, dim, nn.LeakyReLU(0.2, inplace=True), 1)
                                       for _ in range(num_classes))
        self.memory_selectors = nn.ModuleList(_mlp(dim, dim, nn.LeakyReLU(0.2, inplace=True), 1)
                                              for _ in range(num_classes))

    def predict(self, features: Tensor) -> Tensor:
        """``prediction_head(projection_head(f))`` for feature vectors ``(M, C)``."""
        return self.prediction_head(self.projection_head(features))
