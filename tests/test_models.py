import math
import re

import pytest
import torch
from torch import nn

from cifar_study.models import (
    ACTIVATIONS,
    MLP,
    MODELS,
    MLPMixer,
    ResNet18,
    build_model,
    count_parameters,
)

# The models here are small, so one thread is enough and leaves shared cores free.
torch.set_num_threads(1)

BATCH = 2


def make_images(batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("patch_size", "expected"),
    [(2, 2_376_458), (4, 2_188_298), (8, 2_175_818)],
)
def test_mixer_param_count(patch_size, expected):
    assert count_parameters(MLPMixer(patch_size=patch_size)) == expected


def test_resnet18_param_count():
    assert count_parameters(ResNet18()) == 11_173_962


def test_mlp_param_count():
    expected = (
        3072 * 1024 + 1024
        + 1024 * 512 + 512
        + 512 * 64 + 64
        + 64 * 64 + 64
        + 64 * 10 + 10
    )
    assert count_parameters(MLP()) == expected


def test_count_parameters_skips_frozen():
    model = MLP(hidden_sizes=(8,), image_size=4)
    model.head.requires_grad_(False)
    assert count_parameters(model) == 3 * 4 * 4 * 8 + 8


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape(name):
    model = build_model(name).eval()
    with torch.no_grad():
        logits = model(make_images())
    assert logits.shape == (BATCH, 10)


@pytest.mark.parametrize("name", list(MODELS))
def test_channels_last_matches(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    images = make_images()

    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        logits = model(images.to(memory_format=torch.channels_last))

    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast(name):
    model = build_model(name).to(memory_format=torch.channels_last)
    images = make_images().to(memory_format=torch.channels_last)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    logits.float().sum().backward()

    assert logits.shape == (BATCH, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_reaches_all_params(name):
    torch.manual_seed(0)
    model = build_model(name).train()
    labels = torch.tensor([1, 7])

    loss = nn.functional.cross_entropy(model(make_images()), labels)
    loss.backward()

    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} has no gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


def test_build_model_classes():
    assert isinstance(build_model("mlp"), MLP)
    assert isinstance(build_model("resnet18"), ResNet18)
    assert isinstance(build_model("mlpmixer", patch_size=8), MLPMixer)


def test_build_model_passes_kwargs():
    model = build_model("mlp", hidden_sizes=(16,), activation="tanh")
    assert model.layers[0].out_features == 16
    assert isinstance(model.activation, nn.Tanh)


def test_build_model_unknown_name():
    with pytest.raises(ValueError) as excinfo:
        build_model("vit")
    message = str(excinfo.value)
    assert "'vit'" in message
    assert "mlp, resnet18, mlpmixer" in message


def test_mlp_glorot_normal_init():
    torch.manual_seed(0)
    model = MLP()
    linears = [*model.layers, model.head]

    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        expected_std = math.sqrt(2.0 / (fan_in + fan_out))
        std = layer.weight.std().item()
        assert std == pytest.approx(expected_std, rel=0.15), f"{layer} weight std"
        # A uniform draw with this std never exceeds sqrt(3) std, but a normal one of this size does.
        assert layer.weight.abs().max() > 2 * expected_std, f"{layer} weights look non-normal"


def test_mlp_zero_biases():
    model = MLP()
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, f"{name} is not zero"


def test_mlp_param_order():
    names = [name for name, _ in MLP().named_parameters()]
    assert names == [
        "layers.0.weight", "layers.0.bias",
        "layers.1.weight", "layers.1.bias",
        "layers.2.weight", "layers.2.bias",
        "layers.3.weight", "layers.3.bias",
        "head.weight", "head.bias",
    ]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_activation(activation):
    model = MLP(hidden_sizes=(32, 16), activation=activation).eval()
    with torch.no_grad():
        logits = model(make_images())
    assert isinstance(model.activation, ACTIVATIONS[activation])
    assert logits.shape == (BATCH, 10)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mixer_activation(activation):
    model = MLPMixer(patch_size=8, embed_dim=32, num_blocks=1, activation=activation).eval()
    with torch.no_grad():
        logits = model(make_images())
    assert isinstance(model.blocks[0].token_mixing.activation, ACTIVATIONS[activation])
    assert isinstance(model.blocks[0].channel_mixing.activation, ACTIVATIONS[activation])
    assert logits.shape == (BATCH, 10)


def test_mixer_param_names():
    names = {name for name, _ in MLPMixer().named_parameters()}
    for expected in (
        "patch_embed.weight",
        "patch_embed.bias",
        "blocks.0.norm1.weight",
        "blocks.0.token_mixing.fc1.weight",
        "blocks.0.token_mixing.fc2.bias",
        "blocks.0.norm2.weight",
        "blocks.0.channel_mixing.fc1.weight",
        "blocks.0.channel_mixing.fc2.bias",
        "blocks.3.channel_mixing.fc2.weight",
        "norm.weight",
        "head.weight",
    ):
        assert expected in names


@pytest.mark.parametrize(("patch_size", "num_patches"), [(2, 256), (4, 64), (8, 16), (16, 4)])
def test_mixer_token_weight_shape(patch_size, num_patches):
    model = MLPMixer(patch_size=patch_size)
    weight = dict(model.named_parameters())["blocks.0.token_mixing.fc1.weight"]
    assert weight.shape == (128, num_patches)


def test_mixer_hidden_widths():
    block = MLPMixer(embed_dim=128, mlp_ratios=(0.5, 4.0)).blocks[0]
    assert block.token_mixing.fc1.out_features == 64
    assert block.channel_mixing.fc1.out_features == 512


def test_mixer_num_blocks():
    assert len(MLPMixer(num_blocks=6).blocks) == 6


def test_resnet_conv1_shape():
    assert ResNet18().conv1.weight.shape == (64, 3, 3, 3)


def test_dropout_active_in_train():
    model = MLP(hidden_sizes=(64,), dropout=0.5).train()
    images = make_images()
    assert not torch.equal(model(images), model(images))


INVALID_OPTIONS = [
    (MLPMixer, {"patch_size": 5}, "patch_size=5 does not divide image_size=32"),
    (MLPMixer, {"patch_size": 64}, "patch_size=64"),
    (MLPMixer, {"patch_size": 0}, "patch_size=0"),
    (MLPMixer, {"embed_dim": 0}, "embed_dim=0"),
    (MLPMixer, {"num_blocks": -1}, "num_blocks=-1"),
    (MLPMixer, {"num_classes": 0}, "num_classes=0"),
    (MLPMixer, {"image_size": 0}, "image_size=0"),
    (MLPMixer, {"in_channels": 2.5}, "in_channels=2.5"),
    (MLPMixer, {"activation": "swish"}, "activation='swish'"),
    (MLPMixer, {"dropout": 1.0}, "dropout=1.0"),
    (MLPMixer, {"dropout": -0.1}, "dropout=-0.1"),
    (MLPMixer, {"mlp_ratios": (0.5,)}, "mlp_ratios=(0.5,)"),
    (MLPMixer, {"mlp_ratios": (0.5, -4.0)}, "mlp_ratios=(0.5, -4.0)"),
    (MLPMixer, {"mlp_ratios": 4.0}, "mlp_ratios=4.0"),
    (MLPMixer, {"mlp_ratios": (0.001, 4.0)}, "mlp_ratios=(0.001, 4.0)"),
    (MLP, {"activation": "swish"}, "activation='swish'"),
    (MLP, {"hidden_sizes": ()}, "hidden_sizes=()"),
    (MLP, {"hidden_sizes": (64, 0)}, "hidden_sizes[1]=0"),
    (MLP, {"hidden_sizes": 64}, "hidden_sizes=64"),
    (MLP, {"dropout": 1.5}, "dropout=1.5"),
    (MLP, {"num_classes": 0}, "num_classes=0"),
    (MLP, {"image_size": True}, "image_size=True"),
    (ResNet18, {"num_classes": 0}, "num_classes=0"),
    (ResNet18, {"in_channels": 0}, "in_channels=0"),
    (ResNet18, {"widths": (64, 128, 256)}, "widths=(64, 128, 256)"),
    (ResNet18, {"widths": (64, 128, 0, 512)}, "widths[2]=0"),
    (ResNet18, {"blocks": (2, 2, 2, 2, 2)}, "blocks=(2, 2, 2, 2, 2)"),
    (ResNet18, {"blocks": []}, "blocks=[]"),
]


@pytest.mark.parametrize(("model_class", "kwargs", "expected"), INVALID_OPTIONS)
def test_invalid_option(model_class, kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        model_class(**kwargs)


def test_patch_size_error_lists_divisors():
    with pytest.raises(ValueError, match="Use one of its divisors: 1, 2, 4, 8, 16, 32"):
        MLPMixer(patch_size=5)


def test_activation_error_lists_valid():
    with pytest.raises(ValueError, match="Use one of gelu, relu, sigmoid, tanh"):
        MLP(activation="swish")
