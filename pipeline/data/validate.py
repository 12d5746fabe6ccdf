"""Read every listed image once before training: bad files are quarantined, never met mid-epoch."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from pipeline.data.manifest import Record, read_records
from pipeline.data.readers import ReadError, conversion, no_conversion


@dataclass
class Validation:
    good: list[Record]
    bad: list[tuple[Record, str]]          # (record, reason naming its file)
    channels: int | None                   # the count every good image is converted to
    stored: Counter = field(default_factory=Counter)       # stored channel count -> good images
    conversions: Counter = field(default_factory=Counter)  # "grey -> 3 channels by ..." -> images
    sizes: Counter = field(default_factory=Counter)  # (height, width) in pixels -> good images

    def size_summary(self) -> dict | None:
        """Median, smallest and largest (height, width) of the good images, in pixels."""
        if not self.sizes:
            return None
        hs = sorted(h for (h, _), n in self.sizes.items() for _ in range(n))
        ws = sorted(w for (_, w), n in self.sizes.items() for _ in range(n))
        return {"median": [hs[len(hs) // 2], ws[len(ws) // 2]], "min": [hs[0], ws[0]], "max": [hs[-1], ws[-1]],
                "distinct": len(self.sizes)}


def validate_records(records: list[Record], channels: int | None = None, reader_options: dict | None = None,
                     quiet: bool = False) -> Validation:
    """Decode every record (each file once) -> which can be used, converted to how many channels.

    channels: the data set's channel count; None: the largest count among readable images.
    An image is bad when its file cannot be decoded (ReadError) or no conversion turns its
    stored channels into `channels` (channels.conversion: grey -> N, RGB -> grey).
    """
    stored: dict[int, int] = {}
    sizes: dict[int, tuple[int, int]] = {}
    bad: list[tuple[Record, str]] = []
    raw = [replace(r, channels=None) for r in records]  # as stored
    for i, rec, img in tqdm(read_records(raw, **(reader_options or {})), total=len(raw), desc="validate",
                            disable=True if quiet else None, leave=False):  # None: off a terminal too
        if isinstance(img, ReadError):  # readers refuse corrupt, inf-valued and all-nodata images
            bad.append((records[i], str(img)))
        else:
            stored[i], sizes[i] = img.shape[0], tuple(img.shape[1:])
    target = channels or max(stored.values(), default=None)
    result = Validation([], bad, target)
    for i, rec in enumerate(records):
        if i not in stored:
            continue
        how = conversion(stored[i], target)
        if how is None:
            bad.append((rec, no_conversion(rec.path, stored[i], target)))
            continue
        result.good.append(rec)
        result.stored[stored[i]] += 1
        result.sizes[sizes[i]] += 1
        if how:
            result.conversions[how] += 1
    return result
