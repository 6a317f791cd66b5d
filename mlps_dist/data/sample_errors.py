"""A sample that cannot be decoded is named by its shard and key, in one line.

    dataset = NamedSampleErrors(EvalDataset(cfg, reader), reader)

Decoding a corrupt member (bit rot, a tampered offset that stays inside the tar) raises
PIL, zlib or numpy errors that name neither the shard nor the sample. The wrapper turns
them into ``SampleError`` (a ShardError: exit 2): ``TAR: sample KEY cannot be decoded
(...)``. Raised in a DataLoader worker, torch re-raises it in the main process as
``SampleError("Caught SampleError in DataLoader worker ... Original Traceback ...")``:
the constructor keeps only the original one-line message.
"""

from __future__ import annotations

import zlib

from torch.utils.data import Dataset

from mlps_dist.data.shards import ShardError
from mlps_dist.errors import MlpsError

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, KeyError, IndexError)


class SampleError(ShardError):
    def __init__(self, message: str = ""):
        if message.startswith("Caught ") and "Original Traceback" in message:
            tail = [line for line in message.strip().splitlines() if line.strip()][-1]
            message = tail.split(": ", 1)[1] if ": " in tail else tail
        super().__init__(message)


class NamedSampleErrors(Dataset):
    def __init__(self, dataset: Dataset, reader):
        self.dataset, self.reader = dataset, reader

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except MlpsError:
            raise
        except DECODE_ERRORS as exc:
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise SampleError(f"{self.reader.location(index)} cannot be decoded ({type(exc).__name__}: {detail}); "
                              f"rerun tools/make_shards.py on its source (fix or remove the file)") from None
