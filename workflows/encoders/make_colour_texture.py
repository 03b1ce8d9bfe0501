"""Writes colour-texture.ts: the demo's patch encoder, a TorchScript module with no learned
weights. Per channel of the normalised patch, at full and quarter resolution, it takes the mean,
the standard deviation, and the mean absolute horizontal and vertical differences: 24 features
that see the colour and texture the synthetic slides (`hmil-flow synth --slides`) carry their
classes in. Real cohorts use a pathology encoder exported the same way (see the README).

    python workflows/encoders/make_colour_texture.py
"""
from pathlib import Path

import torch
import torch.nn.functional as F


class ColourTexture(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for scale in [1, 4]:
            y = F.avg_pool2d(x, scale) if scale > 1 else x
            features.append(y.mean(dim=(2, 3)))
            features.append(y.std(dim=(2, 3)))
            features.append((y[..., :, 1:] - y[..., :, :-1]).abs().mean(dim=(2, 3)))
            features.append((y[..., 1:, :] - y[..., :-1, :]).abs().mean(dim=(2, 3)))
        return torch.cat(features, dim=1)


if __name__ == "__main__":
    module = torch.jit.script(ColourTexture().eval())
    out = Path(__file__).with_name("colour-texture.ts")
    module.save(str(out))
    print(f"wrote {out}: {tuple(module(torch.rand(2, 3, 64, 64)).shape)} features for 2 patches")
