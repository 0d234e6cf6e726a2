"""The batched multi-crop augmentation: the PIL path's distributions, torchvision's operations.

Two kinds of evidence. (1) Parameters: the random parameters that ``BatchedMultiCrop`` draws for
thousands of views are compared, view by view, with the parameters the PIL path
(``MultiCropTransform``) actually used, recorded by wrapping its operations: crop scale and
aspect, flip, jitter, grayscale, blur and solarize rates, jitter and blur ranges. (2) Operations:
each batched operation with one factor per image equals torchvision's functional operation
applied image by image with that factor.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from dinolab.config import DataConfig
from dinolab.data import batched_augment as batched
from dinolab.data import batched_operations as operations
from dinolab.data import transforms
from dinolab.data.loader import pad_collate

CONFIG = DataConfig(global_crop_size=32, local_crop_size=16, num_local_crops=3,
                    blur_sigma=(0.1, 2.0))
NUM_VIEWS = 2 + CONFIG.num_local_crops
IMAGES = 1500


def _record_pil_parameters(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[Any]]]:
    """Run the PIL path on IMAGES images; -> per view, what each operation received."""
    calls: dict[str, list[Any]] = defaultdict(list)

    def wrap(module: Any, name: str, record: Any) -> None:
        original = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            record(calls, args, kwargs, result)
            return result

        monkeypatch.setattr(module, name, wrapper)

    wrap(transforms, "random_resized_crop_box",
         lambda c, a, k, r: c["box"].append((r, a[0] * a[1])))
    wrap(transforms.F, "resized_crop", lambda c, a, k, r: c["size"].append(r.size))
    wrap(transforms.F, "hflip", lambda c, a, k, r: c["flip"].append(len(c["box"]) - 1))
    wrap(transforms.F, "adjust_brightness", lambda c, a, k, r: c["brightness"].append(a[1]))
    wrap(transforms.F, "adjust_saturation", lambda c, a, k, r: c["saturation"].append(a[1]))
    wrap(transforms.F, "to_grayscale", lambda c, a, k, r: c["gray"].append(len(c["box"]) - 1))
    wrap(transforms.ImageOps, "solarize",
         lambda c, a, k, r: c["solarize"].append(len(c["box"]) - 1))
    wrap(transforms.ImageFilter, "GaussianBlur",
         lambda c, a, k, r: c["blur"].append((len(c["box"]) - 1, a[0])))
    transform = transforms.MultiCropTransform(CONFIG)
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(IMAGES):
        width, height = (int(v) for v in rng.integers(40, 90, size=2))
        transform(Image.new("RGB", (width, height), (120, 80, 40)), generator)
    return calls


@pytest.fixture(scope="module")
def pil_calls() -> dict[str, list[Any]]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _record_pil_parameters(monkeypatch)


@pytest.fixture(scope="module")
def batched_parameters() -> tuple[batched.ViewParameters, torch.Tensor]:
    rng = np.random.default_rng(0)
    sizes = torch.tensor(rng.integers(40, 90, size=(IMAGES, 2)))
    generator = torch.Generator().manual_seed(0)
    return batched.BatchedMultiCrop(CONFIG).sample(sizes, generator), sizes


def _rate_per_view(indices: list[int], total_views: int) -> list[float]:
    """PIL recordings hold the global view index (image * V + view): -> rate per view."""
    counts = np.bincount(np.asarray(indices, dtype=int) % NUM_VIEWS, minlength=NUM_VIEWS)
    return list(counts / (total_views // NUM_VIEWS))


def _batched_rate_per_view(mask: torch.Tensor) -> list[float]:
    return mask.view(NUM_VIEWS, IMAGES).float().mean(dim=1).tolist()  # view-major rows


def _close(actual: list[float], expected: list[float], count: int) -> None:
    for a, e in zip(actual, expected, strict=True):
        tolerance = 4 * math.sqrt(max(e * (1 - e), 0.01) / count) + 1e-9
        assert abs(a - e) <= tolerance, (actual, expected)


def test_flip_grayscale_blur_solarize_rates_match_the_pil_path(pil_calls, batched_parameters):
    parameters, _ = batched_parameters
    total = IMAGES * NUM_VIEWS
    assert len(pil_calls["box"]) == total
    blur_views = [index for index, _ in pil_calls["blur"]]
    for name, pil_indices, mask in [
        ("flip", pil_calls["flip"], parameters.flip),
        ("blur", blur_views, parameters.blur),
        ("solarize", pil_calls["solarize"], parameters.solarize),
    ]:
        pil_rates = _rate_per_view(pil_indices, total)
        batched_rates = _batched_rate_per_view(mask)
        _close(batched_rates, pil_rates, IMAGES)
        assert name  # for the assertion message above
    # The spec's values, view by view: global 1 always blurred, global 2 solarized at 0.2.
    blur_rates = _batched_rate_per_view(parameters.blur)
    assert blur_rates[0] == 1.0
    _close(blur_rates[1:], [0.1] + [0.5] * CONFIG.num_local_crops, IMAGES)
    solarize_rates = _batched_rate_per_view(parameters.solarize)
    assert solarize_rates[0] == 0.0 and all(rate == 0.0 for rate in solarize_rates[2:])
    _close([solarize_rates[1]], [0.2], IMAGES)
    # Grayscale is drawn after the jitter in both paths: the overall rate is 0.2 in both.
    _close([parameters.grayscale.float().mean().item()],
           [len(pil_calls["gray"]) / total], total)


def test_pil_path_follows_the_spec(pil_calls):
    """The PIL path's own figures (DINO_SPEC.md, "Augmentation"): global view 1 always blurred,
    global view 2 solarized at 0.2 and blurred at 0.1, locals blurred at 0.5 and at their size,
    crop areas within each view's scale (up to whole-pixel rounding), sigma in [0.1, 2]."""
    total = IMAGES * NUM_VIEWS
    blur_rates = _rate_per_view([index for index, _ in pil_calls["blur"]], total)
    assert blur_rates[0] == 1.0
    _close(blur_rates[1:], [0.1] + [0.5] * CONFIG.num_local_crops, IMAGES)
    solarize_rates = _rate_per_view(pil_calls["solarize"], total)
    assert solarize_rates[0] == 0.0 and all(rate == 0.0 for rate in solarize_rates[2:])
    _close([solarize_rates[1]], [0.2], IMAGES)
    _close([len(pil_calls["flip"]) / total], [0.5], total)
    _close([len(pil_calls["brightness"]) / total], [0.8], total)
    sigma = torch.tensor([s for _, s in pil_calls["blur"]])
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    sizes = [CONFIG.global_crop_size] * 2 + [CONFIG.local_crop_size] * CONFIG.num_local_crops
    assert pil_calls["size"] == [(size, size) for size in sizes] * IMAGES
    for position, ((_, _, height, width), area) in enumerate(pil_calls["box"]):
        low, high = CONFIG.global_crop_scale if position % NUM_VIEWS < 2 else \
            CONFIG.local_crop_scale
        assert low * 0.9 <= height * width / area <= high * 1.05


def test_jitter_rate_and_factor_ranges_match_the_pil_path(pil_calls, batched_parameters):
    parameters, _ = batched_parameters
    total = IMAGES * NUM_VIEWS
    _close([parameters.jitter.float().mean().item()], [len(pil_calls["brightness"]) / total],
           total)
    brightness = torch.tensor(pil_calls["brightness"])
    saturation = torch.tensor(pil_calls["saturation"])
    factors = parameters.factors
    assert factors[:, 0].min() >= 0.6 and factors[:, 0].max() <= 1.4
    assert factors[:, 1].min() >= 0.6 and factors[:, 1].max() <= 1.4
    assert factors[:, 2].min() >= 0.8 and factors[:, 2].max() <= 1.2
    assert factors[:, 3].abs().max() <= 0.1
    for pil, drawn in ((brightness, factors[:, 0]), (saturation, factors[:, 2])):
        assert drawn.mean().item() == pytest.approx(pil.mean().item(), abs=0.01)
        assert drawn.std().item() == pytest.approx(pil.std().item(), rel=0.1)
    orders = parameters.order.sort(dim=1).values
    assert torch.equal(orders, torch.arange(4).expand_as(orders))  # permutations
    first = torch.bincount(parameters.order[:, 0], minlength=4).float() / len(parameters.order)
    assert torch.allclose(first, torch.full((4,), 0.25), atol=0.03)  # random order


def test_blur_sigma_range_matches_the_pil_path(pil_calls, batched_parameters):
    parameters, _ = batched_parameters
    pil_sigma = torch.tensor([sigma for _, sigma in pil_calls["blur"]])
    drawn = parameters.sigma
    assert drawn.min() >= 0.1 and drawn.max() <= 2.0
    assert drawn.mean().item() == pytest.approx(pil_sigma.mean().item(), abs=0.05)


def test_crop_scales_and_aspects_match_the_pil_path(pil_calls, batched_parameters):
    parameters, sizes = batched_parameters
    pil = torch.tensor([[*box, area] for box, area in pil_calls["box"]], dtype=torch.float64)
    pil_fraction = (pil[:, 2] * pil[:, 3] / pil[:, 4]).view(IMAGES, NUM_VIEWS)
    boxes = parameters.boxes.double().view(NUM_VIEWS, IMAGES, 4)
    area = (sizes[:, 0] * sizes[:, 1]).double()
    fraction = boxes[..., 2] * boxes[..., 3] / area
    for view in range(NUM_VIEWS):
        low, high = CONFIG.global_crop_scale if view < 2 else CONFIG.local_crop_scale
        # Rounding the crop to whole pixels moves the area fraction by a little.
        assert fraction[view].min() >= low * 0.9 and fraction[view].max() <= high * 1.05
        assert fraction[view].mean().item() == pytest.approx(
            pil_fraction[:, view].mean().item(), abs=0.015)
        aspect = boxes[view, :, 3] / boxes[view, :, 2]
        assert aspect.min() >= 3 / 4 * 0.85 and aspect.max() <= 4 / 3 * 1.15
        pil_aspect = (pil[:, 3] / pil[:, 2]).view(IMAGES, NUM_VIEWS)[:, view]
        assert aspect.log().mean().item() == pytest.approx(pil_aspect.log().mean().item(),
                                                           abs=0.03)
        assert aspect.log().std().item() == pytest.approx(pil_aspect.log().std().item(),
                                                          rel=0.15)
    top, left, height, width = boxes.unbind(-1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= sizes[:, 0]).all() and (left + width <= sizes[:, 1]).all()


def test_crop_box_fallback_for_extreme_aspect_ratios() -> None:
    generator = torch.Generator().manual_seed(0)
    boxes = batched.sample_crop_boxes(torch.tensor([10, 400]), torch.tensor([400, 10]),
                                      (0.9, 1.0), generator)
    # No try fits a 1:40 image: the centred crop of the whole image cut to the ratio range.
    assert boxes.tolist() == [[0, 193, 10, 13], [193, 0, 13, 10]]


# ------------------------------------------------------------------------- the operations


def _images(count: int = 5, channels: int = 3, size: int = 12) -> torch.Tensor:
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(3))


# (luma weight, mean-luma weight) of each blend: brightness blends with 0, contrast with the
# mean luma, saturation with the luma (batched_augment._jitter_tables)
_BLEND_WEIGHTS = {"brightness": (0.0, 0.0), "contrast": (0.0, 1.0), "saturation": (1.0, 0.0)}


def _adjust(name: str, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """One colour operation, one factor per image, as the batched augmentation applies it."""
    if name == "hue":
        return operations.adjust_hue(images, factors)
    luma_weight, mean_weight = _BLEND_WEIGHTS[name]
    blend = torch.stack([factors, torch.full_like(factors, luma_weight),
                         torch.full_like(factors, mean_weight)], dim=1)
    return operations.blend_rows(images, blend)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_colour_operations_equal_torchvision_per_image(name: str) -> None:
    images = _images()
    if name == "hue":
        factors = torch.tensor([-0.5, -0.1, 0.0, 0.07, 0.5])
    else:
        factors = torch.tensor([0.0, 0.6, 1.0, 1.3, 2.0])
    ours = _adjust(name, images, factors)
    theirs = torch.stack([getattr(TF, f"adjust_{name}")(image, float(factor))
                          for image, factor in zip(images, factors, strict=True)])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_contrast_of_one_channel_images_equals_torchvision() -> None:
    images = _images(channels=1)
    factors = torch.tensor([0.5, 0.8, 1.0, 1.2, 1.4])
    ours = _adjust("contrast", images, factors)
    theirs = torch.stack([TF.adjust_contrast(image, float(factor))
                          for image, factor in zip(images, factors, strict=True)])
    torch.testing.assert_close(ours, theirs)


def test_grayscale_equals_torchvision() -> None:
    images = _images()
    torch.testing.assert_close(operations.grayscale(images), TF.rgb_to_grayscale(images))


def test_blur_equals_torchvision_per_image() -> None:
    images = _images(size=16)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    radius = operations.blur_radius(images.shape[-1], max_sigma=2.0)
    ours = operations.blur_with_kernels(images, operations.gaussian_kernels(sigma, radius))
    theirs = torch.stack([TF.gaussian_blur(image, kernel_size=[13, 13], sigma=[float(s)] * 2)
                          for image, s in zip(images, sigma, strict=True)])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_gpus_depthwise_blur_equals_the_shifted_sums() -> None:
    """CUDA blurs with a depthwise convolution, CPUs with shifted sums: the same numbers."""
    images = _images(count=6, size=20)
    kernels = operations.gaussian_kernels(torch.tensor([0.1, 0.4, 0.9, 1.3, 1.7, 2.0]), radius=6)
    torch.testing.assert_close(operations.blur_depthwise(images, kernels),
                               operations.blur_with_kernels(images, kernels), rtol=1e-5, atol=1e-6)


def test_crop_of_its_own_size_is_the_exact_pixels_and_padding_is_never_read() -> None:
    """A whole-pixel box of the output's size gives exactly those pixels (pixel centres are
    sampled), with every other operation off."""
    small = torch.randint(0, 256, (3, 6, 9), dtype=torch.uint8)
    large = torch.randint(0, 256, (3, 11, 10), dtype=torch.uint8)
    images, sizes = pad_collate([small, large])
    assert sizes.tolist() == [[6, 9], [11, 10]]
    assert torch.equal(images[0, :, :6, :9], small)
    assert torch.equal(images[0, :, :6, 9], small[:, :, 8])  # the edge repeated, not black
    off = torch.zeros(2, dtype=torch.bool)
    parameters = batched.ViewParameters(
        boxes=torch.tensor([[0.0, 3, 6, 6], [2, 3, 6, 6]]), flip=off, jitter=off,
        factors=torch.ones(2, 4), order=torch.arange(4).repeat(2, 1), grayscale=off, blur=off,
        sigma=torch.ones(2), solarize=off)
    views = batched.BatchedMultiCrop(CONFIG).apply(images.float(), parameters, 6)
    torch.testing.assert_close(views[0], small[:, :6, 3:9].float())
    torch.testing.assert_close(views[1], large[:, 2:8, 3:9].float())
    flipped = batched.BatchedMultiCrop(CONFIG).apply(
        images.float(), batched.ViewParameters(**{**vars(parameters), "flip": ~off}), 6)
    torch.testing.assert_close(flipped, views.flip(-1))


def _reference_view(image: torch.Tensor, parameters: batched.ViewParameters, row: int,
                    kernel_size: int) -> torch.Tensor:
    """One view made with torchvision's functional operations, in the documented order."""
    view = TF.hflip(image) if parameters.flip[row] else image
    if parameters.jitter[row]:
        jitter = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation,
                  TF.adjust_hue]
        for index in parameters.order[row].tolist():
            view = jitter[index](view, float(parameters.factors[row, index]))
    if parameters.grayscale[row] and view.shape[0] == 3:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if parameters.blur[row]:
        sigma = float(parameters.sigma[row])
        view = TF.gaussian_blur(view, [kernel_size, kernel_size], [sigma, sigma])
    if parameters.solarize[row]:
        view = TF.solarize(view, operations.SOLARIZE_THRESHOLD)
    return view


@pytest.mark.parametrize("all_rows", [False, True], ids=["row-selecting", "all-rows"])
@pytest.mark.parametrize("channels", [3, 1])
def test_apply_equals_torchvision_view_by_view(channels: int, all_rows: bool) -> None:
    """The whole chain, with each row's own flip, jitter order and factors, grayscale, blur
    and solarize, equals torchvision's functional operations applied view by view. Boxes of
    the image's own size make the crop exact, so every other operation is compared alone.
    Both paths: the eager one that touches only the rows each operation needs, and the
    all-rows one that train.compile compiles (here uncompiled)."""
    count, size = 48, 12
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(count, channels, size, size, generator=generator)

    def coin(probability: float) -> torch.Tensor:
        return torch.rand(count, generator=generator) < probability

    parameters = batched.ViewParameters(
        boxes=torch.tensor([[0.0, 0.0, size, size]]).repeat(count, 1),
        flip=coin(0.5), jitter=coin(0.8),
        factors=torch.stack([torch.rand(count, generator=generator) * 1.6 + 0.2
                             for _ in range(3)] + [torch.rand(count, generator=generator) - 0.5],
                            dim=1),
        order=torch.rand((count, 4), generator=generator).argsort(dim=1),
        grayscale=coin(0.3), blur=coin(0.5),
        sigma=torch.rand(count, generator=generator) * 1.9 + 0.1, solarize=coin(0.3))
    augment = batched.BatchedMultiCrop(DataConfig(blur_sigma=(0.1, 2.0)))
    if all_rows:
        augment.compiled = batched.augment_all_rows
    views = augment.apply(images, parameters, size)
    kernel_size = 2 * min(math.ceil(3 * 2.0), size - 1) + 1
    expected = torch.stack([_reference_view(image, parameters, row, kernel_size)
                            for row, image in enumerate(images)])
    assert parameters.jitter.sum() > 20 and parameters.blur.sum() > 10
    torch.testing.assert_close(views, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.slow
def test_compiled_augmentation_equals_the_eager_one() -> None:
    """train.compile: the compiled all-rows augmentation gives the eager path's views."""
    config = DataConfig(global_crop_size=24, local_crop_size=12, num_local_crops=2,
                        blur_sigma=(0.1, 2.0))
    images = _images(count=6, size=40).mul(255).byte()
    sizes = torch.tensor([[40, 40], [30, 40], [40, 25], [36, 36], [40, 40], [20, 33]])
    eager = batched.BatchedMultiCrop(config)(images, sizes, torch.Generator().manual_seed(2))
    compiled = batched.BatchedMultiCrop(config, compile=True)(images, sizes,
                                                              torch.Generator().manual_seed(2))
    for ours, theirs in zip(compiled, eager, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_views_shapes_normalisation_and_determinism() -> None:
    config = DataConfig(global_crop_size=16, local_crop_size=8, num_local_crops=2,
                        color_jitter_prob=0.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0),
                        solarize_prob=0.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    augment = batched.BatchedMultiCrop(config)
    gray = torch.full((4, 1, 20, 24), 153, dtype=torch.uint8)  # 0.6 everywhere
    sizes = torch.tensor([[20, 24]] * 4)
    views = augment(gray, sizes, torch.Generator().manual_seed(0))
    assert [tuple(view.shape) for view in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    for view in views:  # (0.6 - 0.5) / 0.25, broadcast to three channels
        torch.testing.assert_close(view, torch.full_like(view, 0.4))
    first = batched.BatchedMultiCrop(CONFIG)(_images(size=40).mul(255).byte(),
                                             torch.tensor([[40, 40]] * 5),
                                             torch.Generator().manual_seed(1))
    again = batched.BatchedMultiCrop(CONFIG)(_images(size=40).mul(255).byte(),
                                             torch.tensor([[40, 40]] * 5),
                                             torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
