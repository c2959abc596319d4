"""The spatial messages (beyond the paper, `config.spatial_messages`): hand-computed messages, the identity at
initialisation, gradients that reach W_m, and regions that receive what lies inside their box."""

import torch

from modeling_mpsm import MPSMConfig, MPSMModel
from modeling_mpsm.modeling_mpsm import MPSMSpatialMessages

from tiny import TINY


def test_messages_by_hand():
    """Box 1 lies inside box 0: C_01 = 1, C_10 = 0.25 (a quarter of box 0 is inside box 1); the padded region 2 sends
    and receives nothing. With W_m = I: x0 + x1 / 2, x1 + 0.25 x0 / 1.25."""
    layer = MPSMSpatialMessages(MPSMConfig(**TINY, spatial_messages=True))
    size = layer.message.weight.shape[0]
    with torch.no_grad():
        layer.message.weight.copy_(torch.eye(size))
        layer.message.bias.zero_()
    regions = torch.randn(1, 3, size)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]]])
    mask = torch.tensor([[True, True, False]])
    out = layer(regions, boxes, mask)
    x0, x1 = regions[0, 0], regions[0, 1]
    torch.testing.assert_close(out[0, 0], x0 + x1 / 2)
    torch.testing.assert_close(out[0, 1], x1 + 0.25 * x0 / 1.25)
    torch.testing.assert_close(out[0, 2], regions[0, 2])


def test_identity_at_initialisation_and_trainable():
    torch.manual_seed(0)
    config = MPSMConfig(**TINY)
    plain = MPSMModel(config).eval()
    with_messages = MPSMModel(MPSMConfig(**TINY, spatial_messages=True)).eval()
    missing, unexpected = with_messages.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"spatial_messages.message.weight", "spatial_messages.message.bias"}
    features = torch.rand(2, 5, config.img_dim)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.1, 0.1, 0.4, 0.5], [0.5, 0.0, 1.0, 1.0], [0.6, 0.2, 0.9, 0.5],
                          [0.0, 0.7, 1.0, 1.0]]).expand(2, 5, 4)
    torch.testing.assert_close(with_messages.encode_image(features, boxes).image_embeds,
                               plain.encode_image(features, boxes).image_embeds)
    with_messages.encode_image(features, boxes).region_embeds.sum().backward()
    assert with_messages.spatial_messages.message.weight.grad.abs().sum() > 0
