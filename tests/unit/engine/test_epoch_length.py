"""SeededAugmentation(length=...): epochs of a fixed number of samples whatever the image count."""
from collections import Counter

from pipeline.engine.state import SeededAugmentation


class Images:
    transform = None

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, 0


def _epoch(ds: SeededAugmentation, epoch: int) -> list[int]:
    ds.set_epoch(epoch)
    return [ds[i][0] for i in range(len(ds))]


def test_without_a_length_an_epoch_is_one_pass_in_index_order():
    ds = SeededAugmentation(Images(5), seed=0)
    assert (len(ds), ds.images) == (5, 5) and _epoch(ds, 3) == [0, 1, 2, 3, 4]


def test_few_images_are_cycled_evenly_within_an_epoch():
    ds = SeededAugmentation(Images(3), seed=0, length=8)
    counts = Counter(_epoch(ds, 1))
    assert len(ds) == 8 and ds.images == 3 and sorted(counts.values()) == [2, 3, 3]


def test_many_images_are_covered_round_after_round_across_epochs():
    ds = SeededAugmentation(Images(10), seed=1, length=4)
    seen = [_epoch(ds, e) for e in range(5)]  # 20 samples: every image exactly twice
    assert all(len(set(s)) == 4 for s in seen)
    assert Counter(i for s in seen for i in s) == {i: 2 for i in range(10)}
    assert seen[0] != list(range(4))  # a seeded order, not the first images of the list
    assert _epoch(SeededAugmentation(Images(10), seed=1, length=4), 2) == seen[2]  # a function of (seed, epoch)
