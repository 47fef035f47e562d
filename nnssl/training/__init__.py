"""The SSL trainer machinery (nnU-Net trainer hooks), one concept per module:

- :mod:`~nnssl.training.environment`: the ``NNSSL_*`` schedule contract and the iteration timer;
- :mod:`~nnssl.training.folds`: folds that fit ``ssl_split.json``;
- :mod:`~nnssl.training.unlabeled_data`: the unlabeled loader and the joint batch;
- :mod:`~nnssl.training.step`: the terms a method returns and the step's log (one host sync);
- :mod:`~nnssl.training.ssl_log`: the per-epoch SSL log (json + png);
- :mod:`~nnssl.training.pseudo_label_quality`: pseudo-label Dice against withheld labels;
- :mod:`~nnssl.training.base`: ``nnUNetTrainerSSLBase``, which composes them (template training step).

The trainer classes users name with ``-tr`` live in the plugin folder ``nnssl_trainers/``; nothing here imports it.
"""
