"""MGCC network and trainer properties (docs/methods/mgcc.md) on tiny CPU networks built like nnU-Net plans."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnssl.losses.mgcc import multi_decoder_consistency
from nnssl.networks.multi_decoder import (
    MGCC_PERTURBATIONS,
    AuxiliaryDecoders,
    FeaturePerturbation,
    MultiDecoderNetwork,
    auxiliary_bottlenecks,
    build_global_context_unet,
)
from nnssl_trainers.mgcc import nnUNetTrainerMGCC, nnUNetTrainerMGCC_noGlobalContext, nnUNetTrainerMGCC_snapshotOrder

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
N_CLASSES = 3


def _arch(dim: int) -> dict:
    """An nnU-Net plans 'architecture' entry for a 4-stage PlainConvUNet with 4..32 features."""
    return {
        "network_class_name": PLAIN_UNET,
        "arch_kwargs": {
            "n_stages": 4, "features_per_stage": [4, 8, 16, 32], "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [[3] * dim] * 4, "strides": [[1] * dim] + [[2] * dim] * 3, "n_conv_per_stage": [2] * 4,
            "n_conv_per_stage_decoder": [2] * 3, "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": REQ_IMPORT,
    }


def _configuration(dim: int):
    return PlansManager({"configurations": {"cfg": {"architecture": _arch(dim)}}}).get_configuration("cfg")


def _model(dim: int = 2, perturbations=MGCC_PERTURBATIONS, global_context: bool = True,
           deep_supervision: bool = False, seed: int = 0) -> MultiDecoderNetwork:
    torch.manual_seed(seed)
    arch = _arch(dim)
    main = build_global_context_unet(PLAIN_UNET, arch["arch_kwargs"], REQ_IMPORT, 1, N_CLASSES, deep_supervision,
                                     n_context_blocks=len(perturbations) if global_context else 0)
    aux = AuxiliaryDecoders(main.encoder, N_CLASSES, arch["arch_kwargs"]["n_conv_per_stage_decoder"], perturbations,
                            deep_supervision)
    return MultiDecoderNetwork(main, aux)


def _input(dim: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, *([16] * dim), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dim", [2, 3])
def test_eval_mode_is_deterministic_and_returns_main_logits_only(dim):
    model = _model(dim).eval()
    x = _input(dim)
    with torch.no_grad():
        first, second = model(x), model(x)
        main_only = model.main(x)
    assert isinstance(first, torch.Tensor) and first.shape == (2, N_CLASSES, *([16] * dim))
    assert torch.equal(first, second) and torch.equal(first, main_only)


@pytest.mark.parametrize("dim,deep_supervision", [(2, False), (3, False), (2, True)])
def test_train_mode_returns_main_and_three_auxiliary_outputs_of_equal_shape(dim, deep_supervision):
    model = _model(dim, deep_supervision=deep_supervision).train()
    outputs = model(_input(dim))
    assert isinstance(outputs, tuple) and len(outputs) == 4
    if deep_supervision:
        shapes = [[tuple(o.shape) for o in out] for out in outputs]
        assert shapes[0][0] == (2, N_CLASSES, *([16] * dim)) and len(shapes[0]) == 3
    else:
        shapes = [tuple(o.shape) for o in outputs]
        assert shapes[0] == (2, N_CLASSES, *([16] * dim))
    assert all(s == shapes[0] for s in shapes)


def _capture_decoder_inputs(model: MultiDecoderNetwork) -> dict[str, list[torch.Tensor]]:
    captured: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def store(_module, args):
            captured[name] = [t.detach().clone() for t in args[0]]
        return store

    model.main.decoder.register_forward_pre_hook(hook("main"))
    for i, decoder in enumerate(model.auxiliary.decoders):
        decoder.register_forward_pre_hook(hook(f"aux{i + 1}"))
    return captured


def test_perturbations_change_every_auxiliary_input_level_but_never_the_main_path():
    model = _model(2).train()
    x = _input(2)
    captured = _capture_decoder_inputs(model)
    with torch.no_grad():
        model.eval()
        reference = model(x)
        _, skips, levels = model.main(x, return_features=True)
        model.train()
        torch.manual_seed(10)
        first = model(x)
        main_inputs = captured["main"]
        aux_inputs = {k: v for k, v in captured.items() if k != "main"}
        torch.manual_seed(11)
        second = model(x)
    # main decoder: clean skips and the last global-context level, identical in train and eval mode
    assert len(main_inputs) == len(skips) + 1
    assert all(torch.equal(a, b) for a, b in zip(main_inputs, [*skips, levels[-1]]))
    assert torch.equal(first[0], reference) and torch.equal(second[0], reference)
    # auxiliary decoder i: every level perturbed (skips included), its bottleneck is chain level i
    for i in range(3):
        clean = [*skips, levels[i]]
        perturbed = aux_inputs[f"aux{i + 1}"]
        assert len(perturbed) == len(clean)
        assert all(p.shape == c.shape and not torch.equal(p, c) for p, c in zip(perturbed, clean))
    # feature dropout (aux1) only zeroes locations; the perturbations are random, so the auxiliary outputs vary
    assert all(torch.all((p == 0) | (p == c)) for p, c in zip(aux_inputs["aux1"], [*skips, levels[0]]))
    assert all(not torch.equal(a, b) for a, b in zip(first[1:], second[1:]))


def test_global_context_levels_are_chained_and_feed_main_last():
    model = _model(2).eval()
    x = _input(2)
    with torch.no_grad():
        _, skips, levels = model.main(x, return_features=True)
        blocks = model.main.global_context.blocks
        assert len(levels) == 4 and torch.equal(levels[0], model.main.encoder(x)[-1])
        assert torch.equal(levels[3], blocks[2](blocks[1](blocks[0](levels[0]))))
        assert torch.equal(model.main(x), model.main.decoder([*skips, levels[3]]))
    assert auxiliary_bottlenecks(levels, 3) == levels[:3]
    assert auxiliary_bottlenecks(levels[:1], 3) == [levels[0]] * 3
    with pytest.raises(ValueError, match="one block per auxiliary decoder"):
        auxiliary_bottlenecks(levels, 2)


def test_auxiliary_decoders_share_the_encoder_without_owning_it():
    model = _model(2).train()
    main_params = {id(p) for p in model.main.parameters()}
    assert not main_params & {id(p) for p in model.auxiliary.parameters()}
    assert not any("encoder" in k for k in model.auxiliary.state_dict())
    x = _input(2)
    # the loss of aux3 alone reaches the shared encoder and CM1, CM2 (its bottleneck is CM2(CM1(x5))), never CM3
    # or the main decoder
    out = model(x)
    out[3].square().mean().backward()
    blocks = model.main.global_context.blocks

    def grad_norm(module):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return float(sum(g.abs().sum() for g in grads)) if grads else 0.0

    assert grad_norm(model.main.encoder) > 0 and grad_norm(blocks[0]) > 0 and grad_norm(blocks[1]) > 0
    assert grad_norm(blocks[2]) == 0 and grad_norm(model.main.decoder.stages) == 0
    assert grad_norm(model.auxiliary.decoders[2]) > 0 and grad_norm(model.auxiliary.decoders[0]) == 0
    # the consistency term is not detached on either side (docs/methods/mgcc.md)
    model.zero_grad(set_to_none=True)
    out = model(x)
    multi_decoder_consistency(out[0], list(out[1:])).backward()
    assert grad_norm(model.main.decoder.stages) > 0 and grad_norm(blocks[2]) > 0
    assert all(grad_norm(d) > 0 for d in model.auxiliary.decoders)


def test_consistency_is_zero_when_decoders_agree_and_positive_under_perturbation():
    identity = tuple(FeaturePerturbation("none") for _ in range(3))
    model = _model(2, perturbations=identity, global_context=False).train()
    main_decoder = {k: v for k, v in model.main.decoder.state_dict().items() if not k.startswith("encoder.")}
    for decoder in model.auxiliary.decoders:
        decoder.load_state_dict(main_decoder, strict=True)
    x = _input(2)
    with torch.no_grad():
        out = model(x)
        assert all(torch.equal(out[0], a) for a in out[1:])
        assert multi_decoder_consistency(out[0], list(out[1:])).item() == 0.0
        model.auxiliary.perturbations = MGCC_PERTURBATIONS  # same weights, perturbed inputs
        out = model(x)
        assert multi_decoder_consistency(out[0], list(out[1:])).item() > 0.0


def test_snapshot_order_variant_swaps_aux1_and_aux3():
    names = [p.name for p in nnUNetTrainerMGCC.auxiliary_perturbations]
    assert names == ["feature_dropout", "spatial_dropout", "feature_noise"]  # MGCC order, docs/methods/mgcc.md
    assert [p.name for p in nnUNetTrainerMGCC_snapshotOrder.auxiliary_perturbations] == names[::-1]
    assert dict(MGCC_PERTURBATIONS[1].kwargs) == {"p": 0.3} and dict(MGCC_PERTURBATIONS[2].kwargs) == {
        "magnitude": 0.3}
    with pytest.raises(ValueError, match="unknown 'blur'"):
        FeaturePerturbation("blur")


@pytest.mark.parametrize("dim", [2, 3])
def test_saved_inference_state_dict_loads_into_the_architecture_predict_builds(dim, tmp_path):
    # nnUNetv2_predict switches on this parameter name to call the current build_network_architecture signature
    assert "plans_manager" in inspect.signature(nnUNetTrainerMGCC.build_network_architecture).parameters
    cm = _configuration(dim)
    torch.manual_seed(0)
    trained = nnUNetTrainerMGCC.build_network_architecture(None, cm, 1, N_CLASSES, True)  # as in training
    assert any(k.startswith("global_context.") for k in trained.state_dict())
    torch.save(trained.state_dict(), tmp_path / "network_weights.pth")
    torch.manual_seed(1)
    predicted = nnUNetTrainerMGCC.build_network_architecture(None, cm, 1, N_CLASSES, enable_deep_supervision=False)
    predicted.load_state_dict(torch.load(tmp_path / "network_weights.pth"), strict=True)
    x = _input(dim)
    trained.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(trained.eval()(x), predicted.eval()(x))
    # the global-context blocks make it another architecture than the plans' plain U-Net
    plain = get_network_from_plans(PLAIN_UNET, cm.network_arch_init_kwargs, REQ_IMPORT, 1, N_CLASSES,
                                   deep_supervision=False)
    with pytest.raises(RuntimeError, match="global_context"):
        plain.load_state_dict(trained.state_dict(), strict=True)


@pytest.mark.parametrize("dim", [2, 3])
def test_no_global_context_variant_saves_a_plain_nnunet(dim):
    cm = _configuration(dim)
    torch.manual_seed(0)
    trained = nnUNetTrainerMGCC_noGlobalContext.build_network_architecture(None, cm, 1, N_CLASSES, True)
    plain = get_network_from_plans(PLAIN_UNET, cm.network_arch_init_kwargs, REQ_IMPORT, 1, N_CLASSES,
                                   deep_supervision=False)
    assert trained.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(trained.state_dict(), strict=True)
    trained.decoder.deep_supervision = False
    x = _input(dim)
    with torch.no_grad():
        assert torch.equal(trained.eval()(x), plain.eval()(x))


def test_two_class_softmax_consistency_equals_the_official_sigmoid_term():
    """Why lambda = 7 carries over: with nnU-Net's 2 output channels the softmax MSE averaged over channels is the
    official binary ``mean((sigmoid(z) - sigmoid(z'))^2)`` of the foreground-minus-background logits."""
    g = torch.Generator().manual_seed(3)
    main = torch.randn(2, 2, 8, 8, generator=g) * 3
    aux = [torch.randn(2, 2, 8, 8, generator=g) * 3 for _ in range(3)]

    def foreground(z):
        return torch.sigmoid(z[:, 1:] - z[:, :1])

    official = torch.stack([(foreground(main) - foreground(a)).pow(2).mean() for a in aux]).mean()
    torch.testing.assert_close(multi_decoder_consistency(main, aux), official)


def test_consistency_ramp_keeps_the_official_ratio_to_the_schedule():
    """Official MGCC: ramp 30 000 iterations over a 20 000-iteration schedule, so lambda ends at 7 exp(-5/9), not 7.
    Short schedules keep that ratio; nnU-Net's 1000 x 250 schedule ramps over the official 30 000 iterations."""
    trainer = object.__new__(nnUNetTrainerMGCC)  # only the schedule attributes are needed
    trainer.num_epochs, trainer.num_iterations_per_epoch = 80, 250  # the official 20 000 iterations
    trainer.current_epoch = 0
    assert trainer.rampup_length() == 30000
    trainer.global_iteration = 20000
    assert trainer.current_unsupervised_weight() == pytest.approx(7 * math.exp(-5 / 9))
    trainer.num_epochs, trainer.num_iterations_per_epoch = 4, 50  # a CPU schedule: same shape, 300 iterations
    assert trainer.rampup_length() == 300
    trainer.global_iteration = 200
    assert trainer.current_unsupervised_weight() == pytest.approx(7 * math.exp(-5 / 9))
    trainer.global_iteration = 50  # early in training the main decoder is not yet pulled towards the auxiliaries
    assert trainer.current_unsupervised_weight() < 0.5
    trainer.num_epochs = 1000  # nnU-Net's default schedule
    assert trainer.rampup_length() == 30000
