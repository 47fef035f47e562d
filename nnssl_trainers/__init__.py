"""nnU-Net v2 trainers for semi-supervised methods.

nnU-Net finds trainers outside its own package through the ``nnUNet_extTrainer`` environment variable, which
must point at this folder (``export nnUNet_extTrainer=$(nnssl_trainer_path)``). nnU-Net imports the modules of
that folder as top-level modules, so modules here use absolute imports only.
"""
