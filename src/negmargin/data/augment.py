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

Crop, resize and flip run through one of three methods that sample the same bilinear points:

* ``gather`` (the CPU's default): separable, columns then rows. Two ``gather`` calls pick each output
  column's two source pixels from the stored uint8 rows (each channel reads the interleaved NHWC row, so
  the result is already planar) and a ``lerp`` blends them; then one ``embedding_bag`` makes each output
  row the weighted sum of its two source rows. No per-pixel coordinate grid and no float copy of the
  source.
* ``grid_sample`` (the default elsewhere): one ``grid_sample`` over a sampling grid built by broadcasting
  (the same grid as ``affine_grid`` for these axis-aligned maps, clamped to the box, and an order of
  magnitude cheaper to build).
* ``roi_align``: per-image boxes through ``torchvision.ops.roi_align``; it cannot clamp its samples to the
  box (see ``resized_crops``).

Without a ``method``, a ``BatchAugment`` uses the one measured fastest on the images' device
(``default_method``; figures in bench/README.md): ``gather`` on the CPU, ``grid_sample`` on CUDA, the only
method measured on a GPU so far. Both reproduce torchvision's edges. ``gather``'s large intermediates live
in a :class:`Workspace` that the ``BatchAugment`` keeps between batches, and steps that do not overlap
share one scratch buffer: on the CPU the work is bound by memory traffic, and a working set that stays in
the caches (13 MiB for 64 images at 96 -> 84 pixels, beside the 5 MiB result), without fresh
multi-megabyte tensors (page faults) every batch, is what makes it fast. So a ``BatchAugment`` is not for
concurrent use from several threads. Each call still returns a new tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from negmargin.errors import UserError

METHODS = ("gather", "grid_sample", "roi_align")
# The method a BatchAugment uses unless told: on each device, the fastest one measured there
# (bench/README.md). On CUDA that is grid_sample, the only one measured on a GPU so far.
DEFAULT_METHODS = {"cpu": "gather"}
FALLBACK_METHOD = "grid_sample"
SCRATCH = "scratch"  # the float buffer that one step at a time borrows: a tap of the resize, then the grayscale
TRIES = 10  # torchvision's RandomResizedCrop attempts before the centre-crop fallback
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2  # jitter op codes, the column order of AugmentParams.factors
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def default_method(device: torch.device | str) -> str:
    """The crop-and-resize method used on ``device`` when none is given."""
    return DEFAULT_METHODS.get(torch.device(device).type, FALLBACK_METHOD)


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


class Workspace:
    """Scratch tensors kept from one batch to the next, one per name, grown when a batch needs more and
    never shrunk. ``take`` returns a view of the named buffer with the shape asked for; its contents are
    whatever the last user left there, so two tensors alive at once need two names. Sharing names keeps
    the working set small (on the CPU, the batch's buffers then stay in the caches)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(*shape)


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
    on ``images.device``. The defaults are those of ``transforms.build_transform("imagenet84", True, ...)``;
    ``method`` None is the device's ``default_method``.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 method: str | None = None) -> None:
        if method is not None and method not in METHODS:
            raise UserError(f"augmentation method {method!r}: expected one of {', '.join(METHODS)}")
        if len(mean) != 3 or len(std) != 3:
            raise UserError(f"augmentation mean {tuple(mean)} / std {tuple(std)}: expected 3 values each (RGB)")
        self.image_size = image_size
        self.scale, self.ratio, self.flip_p = scale, ratio, flip_p
        self.strengths = (brightness, contrast, saturation)
        self.method = method
        self._workspace = Workspace()
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
        method = self.method or default_method(images.device)
        pixels = resized_crops(images, params.boxes, params.flips, self.image_size, method, self._workspace)
        pixels = color_jitter(pixels, params.factors, params.order, self._workspace)
        if self._norm_scale.device != pixels.device:  # moved once, not once per batch
            self._norm_scale, self._norm_shift = self._norm_scale.to(pixels.device), self._norm_shift.to(pixels.device)
        return pixels.mul_(self._norm_scale).add_(self._norm_shift)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or min(images.shape[2:]) < 2:
        raise UserError(f"augmentation input: got {images.dtype} {tuple(images.shape)}, "
                        "expected uint8 [batch, 3, height, width] with height and width at least 2")


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int,
                  method: str = "gather", workspace: Workspace | None = None) -> torch.Tensor:
    """Bilinear (align_corners=False) crops resized to ``size``, flipped where ``flips``; float32 0..255
    rounded to integers, as torchvision's uint8 resize returns them; a new contiguous NCHW tensor.
    ``workspace`` keeps the intermediates of the ``gather`` method (a fresh one when None)."""
    if method == "gather":
        return _gather_resize(images, boxes, flips, size, workspace or Workspace())
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


def _taps(start: torch.Tensor, length: torch.Tensor, size: int, limit: int,
          flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The bilinear taps of ``size`` output pixels along one axis, per image: the lower source index
    (int64 [B, size]; the upper one is the next) and the upper one's weight (float32). Output pixel
    centres map linearly onto the box [start, start + length) and are clamped to its outer pixel centres,
    as ``_sampling_grid``'s are; mirrored where ``flips``. The lower index stops at ``limit`` - 2, so that
    both taps lie inside the image: a position on the last pixel is then the upper tap with weight 1."""
    start = start.to(torch.float32)[:, None]
    length = length.to(torch.float32)[:, None]
    centres = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    if flips is not None:
        centres = torch.where(flips[:, None], size - centres, centres)
    position = start + centres * (length / size) - 0.5
    position = torch.minimum(torch.maximum(position, start), start + length - 1)
    low = position.floor().clamp_(max=limit - 2)
    return low.long(), position.sub_(low)


def _gather_resize(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int,
                   workspace: Workspace) -> torch.Tensor:
    """``resized_crops`` by the ``gather`` method: columns, then rows (see the module docstring)."""
    batch, channels, height, width = images.shape
    device = images.device
    top, left, crop_h, crop_w = boxes.unbind(1)
    x_low, x_weight = _taps(left, crop_w, size, width, flips)
    y_low, y_weight = _taps(top, crop_h, size, height)

    # Columns. Each channel of the result reads the whole interleaved row (stride 0 over channels) and
    # gathers its own samples, so the result [B, C, H, size] is planar. For the loader's batches (NHWC
    # memory seen as NCHW) the reshape is a view; a contiguous NCHW batch is copied once here.
    rows = images.permute(0, 2, 3, 1).reshape(batch, 1, height, width * channels)
    rows = rows.expand(batch, channels, height, width * channels)
    shape = (batch, channels, height, size)
    channel = torch.arange(channels, device=device).view(1, channels, 1, 1)
    picked = workspace.take("picked", shape, torch.uint8, device)
    columns = workspace.take("columns", shape, torch.float32, device)
    upper = workspace.take(SCRATCH, shape, torch.float32, device)
    index = x_low.view(batch, 1, 1, size) * channels + channel  # [B, C, 1, size], expanded over the rows
    torch.gather(rows, 3, index.expand(shape), out=picked)
    columns.copy_(picked)
    torch.gather(rows, 3, (index + channels).expand(shape), out=picked)  # the next pixel along the row
    upper.copy_(picked)
    columns.lerp_(upper, x_weight.view(batch, 1, 1, size))

    # Rows: each output row is a weighted sum of two rows of the planes [B·C·H, size] (row r of plane p
    # is p·H + r), one embedding_bag over the pairs
    planes = batch * channels
    first = (y_low.view(batch, 1, size) + (torch.arange(planes, device=device) * height).view(batch, channels, 1))
    first = first.view(-1)
    weight = y_weight.view(batch, 1, size).expand(batch, channels, size).reshape(-1)
    out = F.embedding_bag(torch.stack([first, first + 1], dim=1), columns.view(planes * height, size),
                          per_sample_weights=torch.stack([1 - weight, weight], dim=1), mode="sum")
    out = out.view(batch, channels, size, size)
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


def color_jitter(pixels: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 workspace: Workspace | None = None) -> torch.Tensor:
    """torchvision's uint8 ColorJitter (brightness, contrast, saturation) on float 0..255 integer values,
    each image with its own factors and op order; in place on ``pixels``, which it returns. ``workspace``
    holds the grayscale plane (a fresh one when None)."""
    batch = len(pixels)
    slot_factors = factors.gather(1, order).view(batch, 3, 1, 1)  # the factor each slot applies
    uses_gray = (order == SATURATION).to(pixels.dtype).view(batch, 3, 1, 1)
    uses_mean = (order == CONTRAST).to(pixels.dtype).view(batch, 3, 1, 1)
    plane = (workspace or Workspace()).take(SCRATCH, (batch, 1, *pixels.shape[2:]), pixels.dtype, pixels.device)
    for slot in range(3):  # the three positions of the random order, not a loop over images
        factor = slot_factors[:, slot : slot + 1]
        red, green, blue = pixels.unbind(1)
        gray = torch.mul(red, GRAY_WEIGHTS[0], out=plane.squeeze(1)).unsqueeze(1)
        gray.add_(green.unsqueeze(1), alpha=GRAY_WEIGHTS[1]).add_(blue.unsqueeze(1), alpha=GRAY_WEIGHTS[2])
        gray = gray.floor_()  # torchvision floors the grayscale of a uint8 image
        mean = gray.mean(dim=(2, 3), keepdim=True)
        # ref = gray (saturation), its mean (contrast) or 0 (brightness); the 0/1 weights keep it exact
        # (two binary ops: a ternary addcmul with two per-image operands takes a slow broadcasting path).
        # The blend must stay one addcmul_: torchvision adds with alpha, a fused multiply-add, and a
        # separately rounded product changes some results by one level
        reference = gray.mul_(uses_gray[:, slot : slot + 1]).add_(mean * uses_mean[:, slot : slot + 1])
        pixels.mul_(factor).addcmul_(reference, 1 - factor).clamp_(0, 255).floor_()  # .to(uint8) truncates
    return pixels
