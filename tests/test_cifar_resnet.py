import numpy as np
import pytest
import torch

from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import CifarResNet, build_model, get_block_adapter, load_cifar_resnet
from hf_freezecache.models.cifar_resnet import CifarResNetAdapter


def test_pretrained_resnet20_reproduces_its_accuracy_on_the_embedded_test_split(resnet20_weights):
    # The shared ResNet-20 scores about 81% on the JPEG copy of the CIFAR-10 test set (../shared/README.md).
    model = load_cifar_resnet(resnet20_weights).eval()
    test = load_image_classification().eval
    batch = collate_image_batch([test[i] for i in range(len(test))])
    with torch.no_grad():
        predictions = model(batch["pixel_values"]).logits.argmax(-1)
    accuracy = (predictions == batch["labels"]).float().mean().item()
    assert 0.76 <= accuracy <= 0.86, accuracy


@pytest.mark.parametrize("weights_fixture, blocks", [("resnet20_weights", 9), ("resnet32_weights", 15)])
def test_prefix_suffix_equal_the_forward_at_every_position(request, weights_fixture, blocks, cifar_batch):
    model = load_cifar_resnet(request.getfixturevalue(weights_fixture)).eval()
    adapter = get_block_adapter(model)
    assert isinstance(adapter, CifarResNetAdapter) and adapter.num_blocks == blocks
    x = cifar_batch["pixel_values"]
    with torch.no_grad():
        reference = model(x).logits
        for position in range(blocks + 1):
            torch.testing.assert_close(
                adapter.suffix(adapter.prefix(x, position), position), reference, rtol=0, atol=0
            )


def test_paper_resnet32_activation_shapes_at_positions_5_and_10():
    # ../shared/README.md: the paper's ResNet-32 caches 32x32x32 after block 5 and 64x16x16 after block 10.
    adapter = get_block_adapter(CifarResNet.from_name("resnet32-paper").eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert adapter.prefix(x, 5).shape == (2, 32, 32, 32)
        assert adapter.prefix(x, 10).shape == (2, 64, 16, 16)


def test_fine_tuning_head_is_reinitialised_and_the_rest_loaded(resnet20_weights):
    reference = load_cifar_resnet(resnet20_weights)
    model = build_model("resnet20", num_labels=7, weights=str(resnet20_weights))
    assert model.linear.out_features == 7
    np.testing.assert_array_equal(model.conv1.weight.detach().numpy(), reference.conv1.weight.detach().numpy())


def test_weights_of_another_depth_are_refused(resnet20_weights):
    with pytest.raises(ValueError, match="depth-20 CIFAR ResNet .* not a resnet32"):
        build_model("resnet32", num_labels=10, weights=str(resnet20_weights))


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)
