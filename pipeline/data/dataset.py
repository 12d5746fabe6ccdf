"""torch Dataset over manifest records: read -> normalise with the data's stats -> augment."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.manifest import Record, read_record
from pipeline.data.stats import Normalizer


class ManifestDataset(Dataset):
    def __init__(self, records: list[Record], stats: dict, transform: Callable | None = None,
                 reader_options: dict | None = None,
                 read_fn: Callable[[Record], np.ndarray] | None = None):
        self.records = records
        self.reader_options = reader_options or {}
        self.read_fn = read_fn  # e.g. pipeline.data.cache.cached_reader(...): record -> raw [C, H, W]
        self.normalize = Normalizer(stats)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rec = self.records[i]
        raw = self.read_fn(rec) if self.read_fn is not None else read_record(rec, **self.reader_options)
        img = self.normalize(raw)  # [C, H, W]
        if self.transform is not None:
            img = self.transform(image=np.ascontiguousarray(img.transpose(1, 2, 0)))["image"]
            img = img.transpose(2, 0, 1)  # [H, W, C] -> [C, H, W]
        return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), rec.label
