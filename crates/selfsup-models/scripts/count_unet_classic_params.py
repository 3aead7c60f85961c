"""Counts the parameters of the classic U-Net as milesial/Pytorch-UNet builds it
(`UNet(n_channels=3, n_classes=2, bilinear=False)`: padded double convs without bias + BN,
2x2 stride-2 transposed convs with bias, a 1x1 head), the figure that
`segnetr::tests::classic_unet_matches_the_reference_size` holds `UNetConfig::classic` to.

Run: python crates/selfsup-models/scripts/count_unet_classic_params.py  (prints 31037698)
"""
import torch.nn as nn


def double_conv(c_in, c_out):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
    )


def classic_unet(n_channels=3, n_classes=2, widths=(64, 128, 256, 512, 1024)):
    layers = nn.ModuleList([double_conv(n_channels, widths[0])])
    layers.extend(double_conv(widths[i - 1], widths[i]) for i in range(1, len(widths)))
    for i in range(len(widths) - 1, 0, -1):
        layers.append(nn.ConvTranspose2d(widths[i], widths[i] // 2, 2, stride=2))
        layers.append(double_conv(widths[i], widths[i - 1]))
    layers.append(nn.Conv2d(widths[0], n_classes, 1))
    return layers


if __name__ == "__main__":
    print(sum(p.numel() for p in classic_unet().parameters()))
