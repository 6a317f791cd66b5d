"""A sample that cannot be decoded is named by its shard and key, in one line.

    dataset = NamedSampleErrors(EvalDataset(cfg, reader), reader)

Decoding a corrupt member (bit rot, a tampered offset that stays inside the tar) raises
PIL, zlib or numpy errors that name neither the shard nor the sample. The wrapper turns
them into ``SampleError`` (a ShardError: exit 2): ``TAR: sample KEY cannot be decoded
(...)``. Raised in a DataLoader worker, torch re-raises it in the main process as
``SampleError("Caught SampleError in DataLoader worker ... Original Traceback ...")``:
the constructor keeps only the original one-line message.

Training never skips (``training=True``: a resume must replay one fixed sample order), so
there the line names only the fix. With ``skip=True`` (evaluation with ``evaluate.skip_bad``) such a sample is named in a
warning and replaced by a blank one whose mask is all ignore (it counts in no metric); every
sample then carries ``bad`` (1 for a replaced one), which the evaluation sums.
"""

from __future__ import annotations

import sys
import zlib

import torch
from torch.utils.data import Dataset

from mlps_dist.data.shards import ShardError
from mlps_dist.core.errors import MlpsError

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, KeyError, IndexError)


class SampleError(ShardError):
    def __init__(self, message: str = ""):
        if message.startswith("Caught ") and "Original Traceback" in message:
            tail = [line for line in message.strip().splitlines() if line.strip()][-1]
            message = tail.split(": ", 1)[1] if ": " in tail else tail
        super().__init__(message)


class NamedSampleErrors(Dataset):
    def __init__(self, dataset: Dataset, reader, skip: bool = False, size: int = 64, training: bool = False):
        """``training``: no skip offered (a resume replays a fixed sample order, which a skipped
        sample would break), so the message names only the fix."""
        self.dataset, self.reader, self.skip, self.size, self.training = dataset, reader, skip, size, training

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            sample = self.dataset[index]
        except MlpsError:
            raise
        except DECODE_ERRORS as exc:
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            message = f"{self.reader.location(index)} cannot be decoded ({type(exc).__name__}: {detail})"
            if not self.skip:
                fix = f"{message}; rerun mlps shards on its source (fix or remove the file)"
                if self.training:  # training never skips: exact resume replays one fixed sample order
                    raise SampleError(f"{fix}; training does not skip samples") from None
                raise SampleError(f"{fix}, or set evaluate.skip_bad=true to leave it out of the metrics") from None
            print(f"warning: {message}: left out of the metrics (evaluate.skip_bad)", file=sys.stderr, flush=True)
            return self.blank(index)
        if self.skip:
            sample["bad"] = torch.tensor(0, dtype=torch.int64)
        return sample

    def blank(self, index: int) -> dict:
        """An evaluation sample that counts in no metric (its mask is all ignore)."""
        h, w = (self.reader.split_info.get("image_size") or [self.size, self.size])[:2]
        return {"image": torch.zeros(3, h, w), "rgb": torch.zeros(3, h, w, dtype=torch.uint8),
                "labels": torch.zeros(self.reader.num_classes), "index": torch.tensor(index, dtype=torch.int64),
                "key": self.reader.key(index), "bad": torch.tensor(1, dtype=torch.int64),
                "mask": torch.full((h, w), self.reader.ignore_index, dtype=torch.int64)}
