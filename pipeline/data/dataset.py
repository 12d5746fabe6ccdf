"""torch Dataset over manifest records: read -> normalise with the data's stats -> augment.

Samples are (image float32 [C, H, W], target): the class index for a multi-class task, or with
`num_labels` set (multi-label) a float32 [num_labels] multi-hot vector of the row's label set."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.labels import multi_hot
from pipeline.data.manifest import Record, read_record
from pipeline.data.stats import Normalizer


class ManifestDataset(Dataset):
    def __init__(self, records: list[Record], stats: dict, transform: Callable | None = None,
                 reader_options: dict | None = None,
                 read_fn: Callable[[Record], np.ndarray] | None = None, num_labels: int | None = None):
        self.records = records
        self.num_labels = num_labels  # multi-label: targets are multi-hot [num_labels]
        self.reader_options = reader_options or {}
        self.read_fn = read_fn  # e.g. pipeline.data.cache.cached_reader(...): record -> raw [C, H, W]
        self.normalize = Normalizer(stats)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        rec = self.records[i]
        raw = self.read_fn(rec) if self.read_fn is not None else read_record(rec, **self.reader_options)
        img = self.normalize(raw)  # [C, H, W]
        if self.transform is not None:
            img = self.transform(image=np.ascontiguousarray(img.transpose(1, 2, 0)))["image"]
            img = img.transpose(2, 0, 1)  # [H, W, C] -> [C, H, W]
        image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        if self.num_labels is not None:
            return image, torch.from_numpy(multi_hot(rec.label, self.num_labels))
        return image, rec.label
