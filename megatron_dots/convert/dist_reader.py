"""Lazy reader of Megatron-Core ``torch_dist`` checkpoints on CPU, one global tensor at a time.

Works without a process group or GPU and whatever TP/PP/EP/VPP layout saved the checkpoint:
PyTorch DCP reassembles a global tensor from the chunks every rank wrote. The ``.metadata``
file is parsed once; each :meth:`DistCheckpointReader.load` reads only the byte ranges of the
requested tensor.
"""

import io
import os
import warnings
from typing import Any, Dict, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from ..storage.errors import CheckpointError, last_line
from ..storage.structure import DCP_METADATA
from ..storage.verify import verify_directory


_COMMON_OBJECT = "common_state/shard_0_1"


class _CachedMetadataReader(FileSystemReader):
    def __init__(self, path: str, metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs):
        return self._metadata


class DistCheckpointReader:
    """A torch_dist checkpoint directory (the one holding `.metadata`)."""

    def __init__(self, directory: str):
        self.directory = directory
        # Sizes against the manifest where there is one, and the structure (every item's
        # bytes present): a damaged checkpoint fails here, naming the file, before any read.
        verdict = verify_directory(directory, "torch_dist")
        if not verdict.intact:
            raise verdict.damage[0]
        self.metadata = verdict.dcp_metadata
        self._reader = _CachedMetadataReader(directory, self.metadata)

    def tensors(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """Stored tensor key -> (global shape, dtype)."""
        return {k: (tuple(v.size), v.properties.dtype)
                for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)}

    def common_state(self) -> Dict[str, Any]:
        """The non-sharded state (iteration, config, ...).

        megatron-core 0.16 (and our converter) keep it in ``common.pt``; 0.19 saves it as the
        pickled object ``common_state/shard_0_1`` inside the DCP files (and still reads
        common.pt).
        """
        path = os.path.join(self.directory, "common.pt")
        if os.path.isfile(path):
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as err:  # noqa: BLE001 - any unpickling failure: name the file
                raise CheckpointError(path, f"unreadable ({type(err).__name__}: {err})") from None
        if _COMMON_OBJECT not in self.metadata.state_dict_metadata:
            raise CheckpointError(path, f"missing, and .metadata has no {_COMMON_OBJECT!r}")
        loaded = self._load({_COMMON_OBJECT: io.BytesIO()})[_COMMON_OBJECT]
        if isinstance(loaded, io.BytesIO):
            loaded.seek(0)
            loaded = torch.load(loaded, map_location="cpu", weights_only=False)
        return loaded[0]  # Megatron stores the list of the objects' data

    def load(self, key: str) -> torch.Tensor:
        """The whole global tensor stored under `key`, on CPU, in its stored dtype."""
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(os.path.join(self.directory, DCP_METADATA),
                                  f"no tensor {key!r}")
        return self._load({key: torch.empty(tuple(md.size), dtype=md.properties.dtype)})[key]

    def _load(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """DCP load into `state` in this process (no process group), metadata cached."""
        with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp_load(state, storage_reader=self._reader, no_dist=True)
            except (Exception, CheckpointException) as err:  # noqa: BLE001 - name what was read
                raise CheckpointError(self._files_of(state), "damaged: reading "
                                      f"{', '.join(map(repr, state))} failed "
                                      f"({type(err).__name__}: {last_line(err)})") from None
        return state

    def _files_of(self, state) -> str:
        """The storage file(s) holding the keys of `state`."""
        files = sorted({info.relative_path for index, info in self.metadata.storage_data.items()
                        if index.fqn in state})
        return ", ".join(os.path.join(self.directory, f) for f in files) or self.directory
