"""The ``imagenet84`` training augmentation over a whole uint8 batch at once, on the batch's device.

It reproduces, batch-wide, the per-image torchvision v2 pipeline of ``transforms.build_transform``:

1. RandomResizedCrop: area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``,
   ``w = round(sqrt(area·r))``, ``h = round(sqrt(area/r))``; the first of 10 tries that fits wins and its
   top-left corner is uniform; when none fits, a centre crop whose ratio is clamped to ``ratio``.
2. Horizontal flip with probability ``flip_p``.
3. Bilinear resize of the crop to ``image_size`` (align_corners=False), rounded to integers as the uint8
   kernel does. Difference: torchvision resizes with ``antialias=True``, which on a downscale widens the
   triangle filter by the scale factor; here downscales are plain bilinear. With 96-pixel stored images
   and 84-pixel outputs a downscale is at most 96/84 = 1.14x; bench/README.md gives the measured size
   of the difference.
4. ColorJitter: brightness, contrast and saturation factors uniform in [1 - s, 1 + s], applied in a
   random order per image. All three are one blend, ``clamp(f·x + (1 - f)·ref)`` truncated to an
   integer (uint8 arithmetic), with ``ref`` = 0 (brightness), the mean of the floored grayscale image
   (contrast) or the floored grayscale image itself (saturation). So the random order runs as 3 slots;
   in each, every image blends with its own ``ref`` and factor, chosen by a mask: no loop over images.
5. ToDtype(float32, scale=True) and Normalize(mean, std), as x·(1/(255·std)) - mean/std.

The random parameters are drawn on the CPU from the ``torch.Generator`` given, in a fixed layout (see
``BatchAugment.draw``), then moved to the images' device: a given (generator state, batch) gives the same
crops, flips, factors and orders on any device, and the same output bit for bit on a given device.

Crop, resize and flip run through ``grid_sample`` (default) or ``roi_align``; both sample the same
bilinear points, except that ``roi_align`` cannot clamp its samples to the box (see ``resized_crops``).
``grid_sample`` is the default: on the CPU the whole augmentation runs about 1.6x faster with it
(bench/README.md), and it reproduces torchvision's edges. Its grid is built by broadcasting: the same
grid as ``affine_grid`` for these axis-aligned maps, clamped to the box, and an order of magnitude cheaper
to build.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from negmargin.errors import UserError

METHODS = ("grid_sample", "roi_align")
TRIES = 10  # torchvision's RandomResizedCrop attempts before the centre-crop fallback
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2  # jitter op codes, the column order of AugmentParams.factors
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class AugmentParams:
    """Per-image random parameters of one batch (on the CPU unless moved)."""

    boxes: torch.Tensor  # int64 [B, 4]: top, left, height, width in stored pixels
    flips: torch.Tensor  # bool [B]
    factors: torch.Tensor  # float32 [B, 3]: brightness, contrast, saturation factors
    order: torch.Tensor  # int64 [B, 3]: the jitter op (BRIGHTNESS, CONTRAST, SATURATION) of each slot

    def to(self, device: torch.device) -> AugmentParams:
        """On ``device``; a copy to CUDA goes through pinned memory without waiting for the GPU (a plain copy
        from pageable memory would stall the training loop once per batch)."""
        tensors = (self.boxes, self.flips, self.factors, self.order)
        if device.type == "cuda":
            return AugmentParams(*(t.pin_memory().to(device, non_blocking=True) for t in tensors))
        return AugmentParams(*(t.to(device) for t in tensors))


def crop_boxes(count: int, height: int, width: int, generator: torch.Generator,
               scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """``count`` RandomResizedCrop boxes (top, left, height, width) for ``height`` x ``width`` images.

    Draws 2·TRIES uniforms per box for the tries, then 2 for the corner, all in one go (float64)."""
    tries = torch.rand(count, TRIES, 2, generator=generator, dtype=torch.float64)
    corner = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * tries[..., 1])
    # torch.round and Python's round both round half to even
    widths = torch.sqrt(area * aspect).round().long()
    heights = torch.sqrt(area / aspect).round().long()
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # index of the first True (0 when none)
    crop_w = widths.gather(1, first).squeeze(1)
    crop_h = heights.gather(1, first).squeeze(1)
    top = (corner[:, 0] * (height - crop_h + 1)).floor().long()
    left = (corner[:, 1] * (width - crop_w + 1)).floor().long()

    fallback = ~fits.any(dim=1)
    if bool(fallback.any()):
        fb_h, fb_w = _fallback_size(height, width, ratio)
        crop_h = torch.where(fallback, fb_h, crop_h)
        crop_w = torch.where(fallback, fb_w, crop_w)
        top = torch.where(fallback, (height - fb_h) // 2, top)
        left = torch.where(fallback, (width - fb_w) // 2, left)
    return torch.stack([top, left, crop_h, crop_w], dim=1)


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's centre crop after 10 failed tries: the whole image, its ratio clamped to ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


class BatchAugment:
    """``imagenet84`` training augmentation of a uint8 batch [B, 3, H, W] into float32 [B, 3, S, S].

    ``augment(images, generator)`` draws the parameters from ``generator`` (see ``draw``) and applies them
    on ``images.device``. The defaults are those of ``transforms.build_transform("imagenet84", True, ...)``.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 method: str = "grid_sample") -> None:
        if method not in METHODS:
            raise UserError(f"augmentation method {method!r}: expected one of {', '.join(METHODS)}")
        if len(mean) != 3 or len(std) != 3:
            raise UserError(f"augmentation mean {tuple(mean)} / std {tuple(std)}: expected 3 values each (RGB)")
        self.image_size = image_size
        self.scale, self.ratio, self.flip_p = scale, ratio, flip_p
        self.strengths = (brightness, contrast, saturation)
        self.method = method
        std_t = torch.tensor(std, dtype=torch.float64)
        # (x/255 - mean)/std as a multiply and an add on the 0..255 values
        self._norm_scale = (1.0 / (255.0 * std_t)).float().view(1, 3, 1, 1)
        self._norm_shift = (-torch.tensor(mean, dtype=torch.float64) / std_t).float().view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_images(images)
        params = self.draw(images.shape[0], images.shape[2], images.shape[3], generator)
        return self.apply(images, params)

    def draw(self, batch: int, height: int, width: int, generator: torch.Generator) -> AugmentParams:
        """Parameters for ``batch`` images, drawn on the CPU in this order: crop tries [B, 10, 2] and corners
        [B, 2] (``crop_boxes``), flips [B], jitter factors [B, 3], order keys [B, 3]. Changing the order
        changes every augmentation of every run, so it is part of the reproducibility contract."""
        boxes = crop_boxes(batch, height, width, generator, self.scale, self.ratio)
        flips = torch.rand(batch, generator=generator, dtype=torch.float64) < self.flip_p
        unit = torch.rand(batch, 3, generator=generator, dtype=torch.float64)
        strength = torch.tensor(self.strengths, dtype=torch.float64)
        low = (1 - strength).clamp(min=0)  # torchvision clips the lower bound at 0
        factors = (low + (1 + strength - low) * unit).float()
        order = torch.rand(batch, 3, generator=generator, dtype=torch.float64).argsort(dim=1)  # uniform perm.
        return AugmentParams(boxes, flips, factors, order)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Crop, resize, flip, jitter and normalise ``images`` (uint8) with ``params``, on their device."""
        _check_images(images)
        params = params.to(images.device)
        pixels = resized_crops(images, params.boxes, params.flips, self.image_size, self.method)
        pixels = color_jitter(pixels, params.factors, params.order)
        if self._norm_scale.device != pixels.device:  # moved once, not once per batch
            self._norm_scale, self._norm_shift = self._norm_scale.to(pixels.device), self._norm_shift.to(pixels.device)
        return pixels.mul_(self._norm_scale).add_(self._norm_shift)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise UserError(f"augmentation input: got {images.dtype} {tuple(images.shape)}, "
                        "expected uint8 [batch, 3, height, width]")


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int,
                  method: str = "grid_sample") -> torch.Tensor:
    """Bilinear (align_corners=False) crops resized to ``size``, flipped where ``flips``; float32 0..255
    rounded to integers, as torchvision's uint8 resize returns them."""
    boxes = boxes.to(torch.float32)
    if method == "grid_sample":
        # channels last puts a bilinear tap's 3 channels side by side (on the CPU, 6.6 against 10.8 ms per
        # batch of 64, best of 30); the loader's NHWC batches are channels last already
        source = images.to(dtype=torch.float32, memory_format=torch.channels_last)
        grid = _sampling_grid(boxes, flips, images.shape[2], images.shape[3], size)
        out = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        from torchvision.ops import roi_align

        source = images.float()
        top, left, height, width = boxes.unbind(1)
        index = torch.arange(len(boxes), device=boxes.device, dtype=torch.float32)
        rois = torch.stack([index, left, top, left + width, top + height], dim=1)
        # aligned=True and one sample per bin: the bin centres, i.e. interpolate's sampling points; but
        # roi_align cannot clamp to the box: on an upscale, the outer rows and columns whose samples fall
        # within half a pixel outside the box (1 or 2 at these scales) blend in the pixel beyond the
        # edge, where torchvision (crop, then resize) repeats the edge pixel
        out = roi_align(source, rois, (size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)
        out = torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
    return out.round_()


def _sampling_grid(boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """The grid ``affine_grid`` makes for the axis-aligned map output -> box (x mirrored where ``flips``),
    clamped to the box's outer pixel centres, built by broadcasting the per-row and per-column coordinates
    instead of a [B, S·S, 3] product. The clamp matters: torchvision crops first, so on an upscale the
    outermost samples (up to half a pixel outside the box) take the box's edge pixel, not a blend with its
    neighbour outside the box."""
    top, left, crop_h, crop_w = boxes.unbind(1)
    sign = 1.0 - 2.0 * flips.to(torch.float32)
    # output pixel centres in [-1, 1]; source pixel x maps to 2(x + 0.5)/W - 1
    centres = (torch.arange(size, device=boxes.device, dtype=torch.float32) * 2 + 1) / size - 1
    xs = (sign * crop_w / width)[:, None] * centres + ((2 * left + crop_w) / width - 1)[:, None]
    ys = (crop_h / height)[:, None] * centres + ((2 * top + crop_h) / height - 1)[:, None]
    xs = xs.clamp(min=((2 * left + 1) / width - 1)[:, None], max=((2 * (left + crop_w) - 1) / width - 1)[:, None])
    ys = ys.clamp(min=((2 * top + 1) / height - 1)[:, None], max=((2 * (top + crop_h) - 1) / height - 1)[:, None])
    grid = torch.empty(len(boxes), size, size, 2, device=boxes.device)
    grid[..., 0] = xs[:, None, :]
    grid[..., 1] = ys[:, :, None]
    return grid


def affine_thetas(boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The [B, 2, 3] ``affine_grid`` matrices whose grids ``_sampling_grid`` builds, before its clamp (for
    the tests and the benchmark)."""
    top, left, crop_h, crop_w = boxes.to(torch.float32).unbind(1)
    sign = 1.0 - 2.0 * flips.to(torch.float32)
    zeros = torch.zeros_like(top)
    return torch.stack([
        torch.stack([sign * crop_w / width, zeros, (2 * left + crop_w) / width - 1], dim=1),
        torch.stack([zeros, crop_h / height, (2 * top + crop_h) / height - 1], dim=1),
    ], dim=1)


def color_jitter(pixels: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's uint8 ColorJitter (brightness, contrast, saturation) on float 0..255 integer values,
    each image with its own factors and op order; in place on ``pixels``, which it returns."""
    batch = len(pixels)
    slot_factors = factors.gather(1, order).view(batch, 3, 1, 1)  # the factor each slot applies
    uses_gray = (order == SATURATION).to(pixels.dtype).view(batch, 3, 1, 1)
    uses_mean = (order == CONTRAST).to(pixels.dtype).view(batch, 3, 1, 1)
    for slot in range(3):  # the three positions of the random order, not a loop over images
        factor = slot_factors[:, slot : slot + 1]
        red, green, blue = pixels.unbind(1)
        gray = red.mul(GRAY_WEIGHTS[0]).add_(green, alpha=GRAY_WEIGHTS[1]).add_(blue, alpha=GRAY_WEIGHTS[2])
        gray = gray.floor_().unsqueeze(1)  # torchvision floors the grayscale of a uint8 image
        mean = gray.mean(dim=(2, 3), keepdim=True)
        # ref = gray (saturation), its mean (contrast) or 0 (brightness); the 0/1 weights keep it exact
        # (two binary ops: a ternary addcmul with two per-image operands takes a slow broadcasting path)
        reference = gray.mul_(uses_gray[:, slot : slot + 1]).add_(mean * uses_mean[:, slot : slot + 1])
        pixels.mul_(factor).addcmul_(reference, 1 - factor).clamp_(0, 255).floor_()  # .to(uint8) truncates
    return pixels
