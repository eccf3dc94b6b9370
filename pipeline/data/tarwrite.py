"""Writing one WebDataset tar: the primitive shared by the shard builders (`shards.writer`) and the loader bench.

Members get fixed mtime/uid/gid so the same samples give byte-identical tars; the file is written under a temporary
name and renamed when complete, so a crash never leaves a half shard under its final name.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sample:
    """One sample to write: `files` maps an extension (`jpg`, `json`, `txt`, `feat.npy`, `1.jpg`) to its bytes."""

    key: str
    files: dict[str, bytes]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = "pill"
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path | str, samples: Sequence[Sample]) -> int:
    """Write samples to `path` via a temp name + rename; returns the file size."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for s in samples:
            for ext, data in s.files.items():
                add_member(tar, f"{s.key}.{ext}", data)
    os.replace(tmp, path)
    return path.stat().st_size
