"""A sample that cannot be decoded is named by its shard and key, in one line.

    dataset = NamedSampleErrors(TrainDataset(cfg, reader, epoch), reader)

Decoding a corrupt member (bit rot, a tampered offset that stays inside the tar) raises
PIL, zlib or numpy errors that name neither the shard nor the sample. They become
``SampleError`` (a ShardError: exit 2): ``TAR: sample KEY cannot be decoded (...)``. Raised
in a DataLoader worker, torch re-raises it in the main process as
``SampleError("Caught SampleError in DataLoader worker ... Original Traceback ...")``: the
constructor keeps only the original one-line message.

Training never skips (a resume must replay one fixed sample order), so its line names only
the fix (``NamedSampleErrors``). The evaluation dataset (torch_loader.EvalDataset) names
its samples the same way and may skip them (``evaluate.skip_bad``, ``masks.skip_bad``).
"""

from __future__ import annotations

import zlib

from torch.utils.data import Dataset

from mlps_dist.core.errors import MlpsError
from mlps_dist.data.shards import ShardError

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, KeyError, IndexError)
REMAKE = "rerun mlps shards on its source (fix or remove the file)"


class SampleError(ShardError):
    def __init__(self, message: str = ""):
        if message.startswith("Caught ") and "Original Traceback" in message:
            tail = [line for line in message.strip().splitlines() if line.strip()][-1]
            message = tail.split(": ", 1)[1] if ": " in tail else tail
        super().__init__(message)


def undecodable(reader, index: int, exc: BaseException) -> str:
    """``TAR: sample KEY cannot be decoded (Type: what the decoder said)``, on one line."""
    detail = " ".join(str(exc).split())[:200] or type(exc).__name__
    return f"{reader.location(index)} cannot be decoded ({type(exc).__name__}: {detail})"


class NamedSampleErrors(Dataset):
    """A training dataset whose undecodable samples stop the run naming shard and key; no
    skip is offered (a resume replays a fixed sample order, which a skipped sample would break)."""

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
            message = undecodable(self.reader, index, exc)
            raise SampleError(f"{message}; {REMAKE}; training does not skip samples") from None
