"""Synthetic anomalies: each kind a small local change, in range, seeded, and something a model can learn to see."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from defectkit import anomalies
from defectkit.anomalies import KINDS, _blob, _cutpaste, _scar, _stroke, draw
from defectkit.evaluation import roc_auc

# Largest share of the pixels each kind may change at 128 px: CutPaste's patch is 2-12% of the image, the scar
# a thin strip, the blob the top 2-10% of smooth noise plus a soft edge, the stroke a thin line.
MAX_CHANGED = {"cutpaste": 0.15, "scar": 0.03, "blob": 0.15, "stroke": 0.05}


def _textured(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _surfaces(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth shaded surfaces with a fine grain, in [0, 1]: what a good part looks like, roughly."""
    grid = torch.rand((n, 3, 6, 6), generator=generator) * 0.5 + 0.25
    base = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return (base + 0.02 * torch.randn((n, 3, size, size), generator=generator)).clamp(0, 1)


def _one(kind: str, image: torch.Tensor, generator: torch.Generator, batch: torch.Tensor) -> torch.Tensor:
    if kind == "cutpaste":
        return _cutpaste(image, generator)
    if kind == "scar":
        return _scar(image, generator)
    if kind == "blob":
        return _blob(image, generator, batch)
    return _stroke(image, generator)


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image (or for one CHW image): the share of pixels where any channel differs."""
    return (a - b).abs().gt(1e-6).any(dim=-3).flatten(-2).float().mean(-1)


def test_the_four_kinds_are_the_documented_ones():
    assert KINDS == ("cutpaste", "scar", "blob", "stroke")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_a_small_nonempty_region(kind):
    batch = _textured(4, 128)
    before = batch.clone()
    shares = []
    for seed in range(60):
        image = batch[seed % 4]
        out = _one(kind, image, torch.Generator().manual_seed(seed), batch)
        assert out.shape == image.shape and out.dtype == image.dtype
        assert out.min() >= 0.0 and out.max() <= 1.0
        shares.append(float(_changed(out, image)))
    assert torch.equal(batch, before)  # the input is left alone
    assert min(shares) >= 0.0005, shares  # at least 8 of the 16384 pixels: never a no-op
    assert max(shares) <= MAX_CHANGED[kind], shares
    assert len(set(shares)) > 30  # position, size and shape vary with the draw


def test_a_cutpaste_patch_is_a_rectangle():
    image = _textured(1, 64)[0]
    for seed in range(20):
        out = _cutpaste(image, torch.Generator().manual_seed(seed))
        ys, xs = torch.nonzero((out - image).abs().gt(1e-6).any(0), as_tuple=True)
        box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
        # Random texture: nearly every pixel of the pasted rectangle differs from what was there.
        assert len(ys) >= 0.9 * box and box <= 0.13 * 64 * 64


def test_a_blob_is_filled_from_another_image_of_the_batch_or_a_tone_of_its_own():
    grey = torch.full((3, 64, 64), 0.5) + 0.05 * _textured(1, 64)[0]
    red = torch.zeros((3, 64, 64))
    red[0] = 1.0
    batch = torch.stack([grey, red])
    reddened = []
    for seed in range(40):
        out = _blob(grey, torch.Generator().manual_seed(seed), batch)
        region = _changed(out, grey) > 0
        assert region.any()
        mask = (out - grey).abs().gt(1e-6).any(0)
        reddened.append(float((out[0] - out[1])[mask].max()) > 0.3)
    # Half of the blobs take the other image's texture (red here), the rest a shifted tone of their own (grey).
    assert 8 <= sum(reddened) <= 32, reddened


def test_draw_puts_one_anomaly_on_every_image_in_range_and_leaves_the_input_alone():
    x = _textured(32, 128)
    before = x.clone()
    out = draw(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(x, before)
    shares = _changed(out, x)
    assert (shares > 0).all() and (shares <= max(MAX_CHANGED.values())).all(), shares


def test_draw_is_seeded():
    x = _textured(8, 32)
    a = draw(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, draw(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, draw(x, torch.Generator().manual_seed(4)))
    generator = torch.Generator().manual_seed(3)
    first, second = draw(x, generator), draw(x, generator)
    assert torch.equal(first, a) and not torch.equal(second, a)  # the generator's stream moves on


def test_draw_works_on_a_batch_of_one_and_on_the_edges_of_the_range():
    image = _textured(1, 32)
    for seed in range(40):  # every kind comes up, the blob filled from the only image there is
        out = draw(image, torch.Generator().manual_seed(seed))
        assert out.shape == (1, 3, 32, 32) and 0.0 <= out.min() and out.max() <= 1.0
    for value in (0.0, 1.0):
        flat = torch.full((4, 3, 32, 32), value)
        out = draw(flat, torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0


def test_every_drawn_image_differs_from_its_input_at_the_32_px_training_size():
    x = _textured(400, 32)
    shares = _changed(draw(x, torch.Generator().manual_seed(0)), x)
    assert int((shares == 0).sum()) == 0


def test_drawn_anomalies_are_learnable_from_simple_features():
    """A logistic regression on the Laplacian's statistics tells drawn surfaces from clean ones: a flaw a network can
    learn to see, not noise it must memorise."""
    generator = torch.Generator().manual_seed(0)
    n = 300
    clean = _surfaces(n, 32, generator)
    drawn = draw(_surfaces(n, 32, generator), torch.Generator().manual_seed(1))

    def features(x: torch.Tensor) -> torch.Tensor:
        kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        laplacian = F.conv2d(x, kernel, groups=3).abs().amax(1).flatten(1)
        return torch.stack([laplacian.amax(1), laplacian.quantile(0.99, dim=1), laplacian.quantile(0.95, dim=1),
                            laplacian.mean(1)], 1)

    x = torch.cat([features(clean), features(drawn)])
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    order = torch.randperm(2 * n, generator=generator)
    x, y = x[order], y[order]
    train, test = slice(0, n), slice(n, 2 * n)
    x = (x - x[train].mean(0)) / x[train].std(0)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=100)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x[train] @ w + b, y[train])
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scores = x[test] @ w + b
    assert roc_auc(y[test].numpy(), scores.numpy()) > 0.8
    # Clean surfaces against clean surfaces: the same features find nothing.
    other = features(_surfaces(2 * n, 32, torch.Generator().manual_seed(2)))
    with torch.no_grad():
        chance = ((other - features(clean).mean(0)) / features(clean).std(0)) @ w + b
    assert 0.35 < roc_auc(torch.arange(2 * n).ge(n).numpy(), chance.numpy()) < 0.65


def test_the_module_draws_from_the_given_generator_only():
    x = _textured(4, 32)
    torch.manual_seed(0)
    a = anomalies.draw(x, torch.Generator().manual_seed(9))
    torch.manual_seed(1)  # the global generator plays no part
    assert torch.equal(a, anomalies.draw(x, torch.Generator().manual_seed(9)))
