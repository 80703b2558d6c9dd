import numpy as np
import pytest
import torch

from pneumo.config import TrainConfig
from pneumo.data.augment import augment
from pneumo.data.datamodule import RsnaDataModule
from pneumo.data.layout import CLASSES
from pneumo.data.prepare import prepare


@pytest.fixture(scope="module")
def prepared(synth_dir, tmp_path_factory):
    return prepare(synth_dir, out=tmp_path_factory.mktemp("prep") / "p", image_size=64, workers=1)


def test_batches_come_from_the_cache_with_masks_from_boxes(prepared):
    dm = RsnaDataModule(prepared, TrainConfig(image_size=64, batch_size=8, depth=3))
    batch = next(iter(dm.val_dataloader()))
    images, masks, rows = batch["images"], batch["masks"], batch["rows"]
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 64, 64)
    assert masks.shape == images.shape
    cache = prepared.images()
    for i, row in enumerate(rows.tolist()):
        assert np.array_equal(images[i, 0].numpy(), cache[row])
        has_boxes = len(dm.gt_boxes[row]) > 0
        assert bool(masks[i].any()) == has_boxes
    assert set(dm.train_rows).isdisjoint(dm.val_rows)
    # the classifier's targets and metadata come from features.csv, row for row
    features = prepared.features.set_index("index")
    for i, row in enumerate(rows.tolist()):
        assert CLASSES[int(batch["classes"][i])] == features.loc[row, "class"]
        assert float(batch["metadata"][i, 0]) == (1.0 if features.loc[row, "ViewPosition"] == "AP" else 0.0)


def test_epochs_shuffle_differently_but_reproducibly(prepared):
    dm = RsnaDataModule(prepared, TrainConfig(image_size=64, batch_size=8, depth=3))
    loader = dm.train_dataloader()

    def order(epoch):
        loader.sampler.set_epoch(epoch)
        return [r for batch in loader for r in batch["rows"].tolist()]

    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(order(1)) == sorted(dm.train_rows.tolist())


def test_max_images_keeps_every_class_and_split(prepared):
    dm = RsnaDataModule(prepared, TrainConfig(image_size=64, depth=3, max_images=12))
    assert 6 <= len(dm.train_rows) + len(dm.val_rows) <= 16 and len(dm.val_rows) >= 1


def test_augment_moves_images_and_masks_together():
    images = torch.zeros(4, 1, 64, 64)
    images[:, :, 20:40, 10:30] = 1.0
    masks = (images > 0).float()
    out_images, out_masks = augment(images, masks, torch.Generator().manual_seed(0))
    assert out_images.shape == images.shape and ((out_masks == 0) | (out_masks == 1)).all()
    bright = out_images > 0.5
    agree = (bright == out_masks.bool()).float().mean()
    assert agree > 0.97  # the box moved, and its mask moved with it
    assert not torch.equal(out_masks, masks)


def test_fast_affine_grid_equals_torch_affine_grid():
    import torch.nn.functional as F

    from pneumo.data.augment import _affine_grid

    theta = torch.eye(2, 3).repeat(4, 1, 1) + 0.1 * torch.rand(4, 2, 3, generator=torch.Generator().manual_seed(0))
    for h, w in ((64, 64), (48, 80)):
        expected = F.affine_grid(theta, [4, 1, h, w], align_corners=False)
        assert torch.allclose(_affine_grid(theta, h, w), expected, atol=1e-5)
