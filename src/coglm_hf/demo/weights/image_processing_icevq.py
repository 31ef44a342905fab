"""Image pre- and post-processing of icetk's image tokenizer, for PIL images, numpy arrays and torch tensors.

icetk: optional `Resize(image_size)` (shorter side to `image_size`, bilinear) and `CenterCrop(image_size)`, then
`ToTensor` (RGB in [0, 1]); normalisation happens inside `IceVQModel`. Decoded images come back in about [0, 1]
and are clamped here for display.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | Sequence[PIL.Image.Image | np.ndarray | torch.Tensor]


def _resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    # torchvision Resize(int): the shorter side becomes `size`, the longer keeps the aspect ratio (truncated)
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    # torchvision CenterCrop: top/left offsets rounded half to even, like Python's round
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


class IceVQImageProcessor:
    """Turns images into `IceVQModel.encode` input and decoded images into PIL / numpy / torch output.

    Args:
        image_size: if set, every image is resized (shorter side) and centre-cropped to `image_size` squared, as
            icetk's `encode(..., image_size=...)`; if `None`, sizes are kept (then every image of a batch must
            have the same size, a multiple of the compression rate).

    Example:

    ```python
    >>> processor = IceVQImageProcessor(image_size=160)
    >>> ids = vq.encode(processor.preprocess(pil_image))             # [1, 20, 20] at rate 8
    >>> images = processor.postprocess(vq.decode(ids), output_type="pil")
    ```
    """

    def __init__(self, image_size: int | None = None):
        if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        self.image_size = image_size

    def _to_tensor(self, image: PIL.Image.Image | np.ndarray | torch.Tensor, size: int | None) -> torch.Tensor:
        """One image -> float32 `[3, H, W]` in [0, 1], resized and cropped if `size`."""
        if isinstance(image, PIL.Image.Image):
            image = image.convert("RGB")
            if size is not None:
                height, width = _resized_size(image.height, image.width, size)
                image = image.resize((width, height), PIL.Image.BILINEAR)
                top, left = _crop_box(height, width, size)
                image = image.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"numpy images must be [H, W, 3] (RGB, channels last), got {image.shape}")
            tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        elif isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"tensor images must be [3, H, W] (RGB, channels first), got {tuple(image.shape)}")
            tensor = image.detach().cpu()
        else:
            raise TypeError(f"images must be PIL images, numpy arrays or torch tensors, got {type(image).__name__}")
        if tensor.dtype == torch.uint8:
            tensor = tensor.float() / 255.0
        elif tensor.is_floating_point():
            tensor = tensor.float()
        else:
            raise TypeError(f"image arrays must be uint8 (0..255) or float (0..1), got {tensor.dtype}")
        if size is not None:
            height, width = _resized_size(*tensor.shape[-2:], size)
            tensor = F.interpolate(tensor[None], size=(height, width), mode="bilinear", align_corners=False,
                                   antialias=True)[0]
            top, left = _crop_box(height, width, size)
            tensor = tensor[:, top : top + size, left : left + size]
        return tensor

    def preprocess(self, images: ImageInput, image_size: int | None = None) -> torch.Tensor:
        """PIL image(s), `[H, W, 3]` / `[B, H, W, 3]` arrays or `[3, H, W]` / `[B, 3, H, W]` tensors -> float32
        `[B, 3, H, W]` RGB in [0, 1] (uint8 input is divided by 255, float input is taken as [0, 1]).

        Args:
            images: one image or a batch/list of images.
            image_size: overrides the processor's `image_size` for this call.
        """
        size = self.image_size if image_size is None else image_size
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images.unbind(0))
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        tensors = [self._to_tensor(image, size) for image in images]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes {sorted(shapes)}; pass image_size to resize and crop them")
        return torch.stack(tensors)

    def postprocess(self, images: torch.Tensor, output_type: str = "pil") -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Decoded `[B, 3, H, W]` images (about [0, 1]) -> clamped to [0, 1] and converted.

        Args:
            images: output of `IceVQModel.decode`.
            output_type: `"pil"` (list of RGB images), `"np"` (float32 `[B, H, W, 3]`) or `"pt"` (float32
                `[B, 3, H, W]`).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a [B, 3, H, W] tensor, got {shape}")
        images = images.detach().float().clamp(0, 1).cpu()
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        return [PIL.Image.fromarray((image * 255).round().astype(np.uint8)) for image in array]


__all__ = ["IceVQImageProcessor"]
