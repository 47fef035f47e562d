"""MGCC's first stage: a latent diffusion model (MONAI's ``AutoencoderKL`` + ``DiffusionModelUNet``) trained on a
dataset's training images generates unlabeled images for it (``nnssl_generate_unlabeled``).

One concept a module: :mod:`.settings` (the presets), :mod:`.data` (the training images at the configuration's
preprocessing, and the way back to the raw intensities), :mod:`.train` (resumable training of both models),
:mod:`.sample` (resumable sampling into raw files), :mod:`.report` (the sanity report), :mod:`.cli` (the command).
See docs/methods/mgcc.md, "Stage 1: generated unlabeled images".
"""
