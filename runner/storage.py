"""Where a job's outputs live: a local (or mounted: NFS, EFS) directory, or a URI of a filesystem that
pyarrow opens (`s3://`, `gs://`, `hdfs://`, `file://`): the same filesystems Ray Train's storage uses,
so checkpoints, the adapter, `DONE` and the tuner's state all land in one place that outlives the
Ray session and the machine the driver ran on."""

from __future__ import annotations

import io
from pathlib import Path


def is_uri(location: str) -> bool:
    return "://" in location


def absolute(location: str) -> str:
    """A URI as given; a local path made absolute (a submitted job runs in a temporary copy of the
    working directory, and relative outputs would be written there)."""
    return location if is_uri(location) else str(Path(location).expanduser().absolute())


def sibling(location: str, name: str) -> str:
    """`location`'s neighbour called `name` (the same folder; a URI keeps its options)."""
    if not is_uri(location):
        return str(Path(location).parent / name)
    base, _, options = location.partition("?")
    return f"{base.rstrip('/').rsplit('/', 1)[0]}/{name}" + (f"?{options}" if options else "")


class Location:
    """A file or directory under a job's output root, local or remote, with the few path operations
    fitrun needs (pathlib's names, so that the code reads the same for both)."""

    def __init__(self, location: str):
        import pyarrow.fs

        base, _, self.options = absolute(location).partition("?")  # s3://b/x?endpoint_override=...&scheme=http
        self.base = base.rstrip("/")
        self.uri = f"{self.base}?{self.options}" if self.options else self.base
        if is_uri(self.uri):
            self.fs, self.path = pyarrow.fs.FileSystem.from_uri(self.uri)
        else:
            self.fs, self.path = pyarrow.fs.LocalFileSystem(), self.uri

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.base}/{name}" + (f"?{self.options}" if self.options else ""))

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    @property
    def name(self) -> str:
        return self.base.rsplit("/", 1)[-1]

    def _type(self):
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        import pyarrow.fs

        return self._type() != pyarrow.fs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs

        return self._type() == pyarrow.fs.FileType.Directory

    def size(self) -> int | None:
        """A file's size in bytes; None when it is not a file."""
        import pyarrow.fs

        info = self.fs.get_file_info(self.path)
        return info.size if info.type == pyarrow.fs.FileType.File else None

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self) -> None:
        """Remove a file; nothing if it is not there."""
        if self.exists():
            self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """Remove a directory and everything below it; nothing if it is not there."""
        if self.is_dir():
            self.fs.delete_dir(self.path)

    def names(self, prefix: str = "") -> list[str]:
        """The names directly below this directory that start with `prefix`, sorted."""
        import pyarrow.fs

        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path))
        return sorted(i.base_name for i in infos if i.base_name.startswith(prefix))

    def upload(self, local_dir: Path) -> None:
        """Replace this directory with a copy of `local_dir`."""
        import pyarrow.fs

        self.rmtree()
        self.mkdir()
        pyarrow.fs.copy_files(str(local_dir), self.path, destination_filesystem=self.fs)

    def save_figure(self, fig, **kwargs) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=self.name.rsplit(".", 1)[-1], **kwargs)
        self.write_bytes(buffer.getvalue())
