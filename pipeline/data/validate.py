"""Read every listed image once before training: bad files are quarantined, never met mid-epoch."""
from __future__ import annotations

from collections import Counter

from tqdm import tqdm

from pipeline.data.manifest import Record, read_record
from pipeline.data.readers import ReadError


def validate_records(records: list[Record], channels: int | None = None, reader_options: dict | None = None,
                     quiet: bool = False) -> tuple[list[Record], list[tuple[Record, str]]]:
    """-> (good records, [(bad record, reason)]). The expected channel count is `channels`, or
    the most common count among readable images; any other count is a bad file."""
    counts: dict[int, int] = {}
    bad: list[tuple[Record, str]] = []
    for i, rec in enumerate(tqdm(records, desc="validate", disable=quiet, leave=False)):
        try:
            img = read_record(rec, **(reader_options or {}))
        except ReadError as err:  # readers refuse corrupt, inf-valued and all-nodata images
            bad.append((rec, str(err)))
            continue
        counts[i] = img.shape[0]
    expected = channels or (Counter(counts.values()).most_common(1)[0][0] if counts else None)
    good = []
    for i, rec in enumerate(records):
        if i not in counts:
            continue
        if counts[i] != expected:
            bad.append((rec, f"{rec.path}: {counts[i]} channels, the data set has {expected}"))
        else:
            good.append(rec)
    return good, bad
