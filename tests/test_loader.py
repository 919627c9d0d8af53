import torch

from igkd.data.loader import DeviceLoader, crop_flip


def _indexed_images(n=20, size=8):
    """Image i carries i in every pixel of channel 0 and random content elsewhere."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    images[:, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None] + 1
    return images


def test_extras_get_exactly_the_crop_and_flip_of_their_image():
    images = _indexed_images()
    maps = images[:, 1].to(torch.float16)  # an extra that IS channel 1 of each image
    loader = DeviceLoader(images, torch.zeros(20, dtype=torch.long), 6, extras={"ig": maps, "rgb": images.float()}, seed=3)
    flips = 0
    for batch in loader:
        assert torch.equal(batch.extras["ig"], batch.images[:, 1] * 255)
        assert torch.equal(batch.extras["rgb"], batch.images * 255)
        original = images[batch.indices, 1].float()
        flips += sum(not torch.equal(batch.extras["ig"][i], original[i]) for i in range(len(batch.indices)))
    assert flips > 0  # augmentation really happened


def test_batch_indices_identify_samples():
    images = _indexed_images()
    labels = torch.arange(20) * 3
    subset = torch.tensor([1, 4, 5, 9, 13, 17])
    loader = DeviceLoader(images, labels, 4, indices=subset, augment=False, seed=0)
    seen = []
    for batch in loader:
        assert torch.equal(batch.labels, labels[batch.indices])
        assert torch.equal((batch.images[:, 0, 0, 0] * 255).round().long() - 1, batch.indices)
        seen += batch.indices.tolist()
    assert sorted(seen) == subset.tolist()


def test_crop_is_zero_padded_shift_and_identity_at_centre():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    pad = 2
    same = crop_flip(x, torch.tensor([pad, pad]), torch.tensor([pad, pad]), torch.tensor([False, False]), pad)
    assert torch.equal(same, x)
    shifted = crop_flip(x, torch.tensor([0, 4]), torch.tensor([pad, pad]), torch.tensor([False, True]), pad)
    assert torch.equal(shifted[0, 0, :, 2:], x[0, 0, :, :2]) and (shifted[0, 0, :, :2] == 0).all()
    assert torch.equal(shifted[1, 0].flip(-1)[:, :2], x[1, 0, :, 2:])


def test_epochs_are_reproducible_and_differ():
    images = _indexed_images()
    labels = torch.zeros(20, dtype=torch.long)
    a = DeviceLoader(images, labels, 7, seed=5)
    b = DeviceLoader(images, labels, 7, seed=5)
    a.set_epoch(2), b.set_epoch(2)
    first = [x.images for x in a]
    assert all(torch.equal(x, y.images) for x, y in zip(first, b))
    b.set_epoch(3)
    assert not all(torch.equal(x, y.images) for x, y in zip(first, b))


def test_ranks_get_disjoint_shards():
    images = _indexed_images(21)
    labels = torch.zeros(21, dtype=torch.long)
    shards = [sum((batch.indices.tolist() for batch in DeviceLoader(images, labels, 4, seed=1, rank=r, world_size=2)), []) for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 10


def test_host_to_device_copies_are_per_epoch_not_per_step():
    """Each step only slices device tensors: the number of .to() calls in an epoch does not grow with its steps
    (three blocking copies per step would make a GPU wait for the CPU every step)."""
    from torch.overrides import TorchFunctionMode

    class CountTo(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to:
                self.calls += 1
            return func(*args, **(kwargs or {}))

    images = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(64) % 4
    counts = []
    for batch_size in (32, 4):  # 2 steps, then 16 steps
        loader = DeviceLoader(images, labels, batch_size, extras={"ig": torch.rand(64, 8, 8)})
        with CountTo() as mode:
            steps = sum(1 for _ in loader)
        counts.append((steps, mode.calls))
    assert counts[0][0] == 2 and counts[1][0] == 16
    assert counts[0][1] == counts[1][1], counts
