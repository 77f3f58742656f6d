"""Where archives live: a local directory (the default) or an S3-compatible object store.

`ARCHIVE_URL` unset: `${XDG_DATA_HOME:-~/.local/share}/llm-usage-pipeline/archive`, a data
directory rather than the state directory under /tmp, since an archive is the only copy of a
dropped month and must survive a reboot. A path or `file://` URL: that directory.
`s3://bucket/prefix`: that bucket and prefix, through pyarrow's S3 client, with
ARCHIVE_S3_ENDPOINT_URL for a store other than AWS and the ARCHIVE_S3_* keys (unset: the AWS
default chain: environment, profile, instance role).

A month lives under `<root>/YYYY-MM/`: its slice files, then `manifest.json`, written last. A
local file is written under a temporary name and renamed; an object appears whole when its
upload completes.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from llm_usage.core.errors import ConfigurationError, ServiceUnreachableError, UserFacingError

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings

_MONTH_DIR = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


class ArchiveError(UserFacingError):
    """An archive that is missing, incomplete, already there, or cannot be reached."""


def default_archive_dir() -> Path:
    """`${XDG_DATA_HOME:-~/.local/share}/llm-usage-pipeline/archive` (not created here)."""
    xdg_data = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg_data).expanduser() if xdg_data else Path.home() / ".local" / "share"
    return base / "llm-usage-pipeline" / "archive"


@dataclass(frozen=True)
class ArchiveTarget:
    """A root in a pyarrow filesystem; `url` is what a person sees in messages."""

    filesystem: pafs.FileSystem
    root: str
    url: str
    local: bool

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def month_dir(self, period: str) -> str:
        return self.path(period)

    def exists(self, path: str) -> bool:
        return bool(self._call(self.filesystem.get_file_info, path).type != pafs.FileType.NotFound)

    def read_bytes(self, path: str) -> bytes:
        with self._call(self.filesystem.open_input_stream, path) as stream:
            return bytes(stream.read())

    def open_input(self, path: str) -> pa.NativeFile:
        return self._call(self.filesystem.open_input_file, path)

    def size(self, path: str) -> int:
        return int(self._call(self.filesystem.get_file_info, path).size or 0)

    def files_in(self, directory: str) -> list[str]:
        """The names of the files directly in `directory` ([] if there is none)."""
        selector = pafs.FileSelector(directory, allow_not_found=True, recursive=False)
        infos = self._call(self.filesystem.get_file_info, selector)
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)

    def months(self) -> list[str]:
        """Every `YYYY-MM` directory under the root, oldest first."""
        selector = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        infos = self._call(self.filesystem.get_file_info, selector)
        return sorted(
            info.base_name
            for info in infos
            if info.type == pafs.FileType.Directory and _MONTH_DIR.match(info.base_name)
        )

    @contextmanager
    def writing(self, path: str) -> Iterator[IO[bytes]]:
        """A stream to write `path` with: it appears whole, or not at all on an error."""
        directory = path.rsplit("/", 1)[0]
        self._call(self.filesystem.create_dir, directory, recursive=True)
        staged = f"{path}.partial" if self.local else path
        stream = self._call(self.filesystem.open_output_stream, staged)
        try:
            yield stream
        except BaseException:
            # Closing completes an S3 upload: the partial object is deleted like a local file
            # (and a month has no manifest until every file is whole, so none is ever trusted).
            with contextlib.suppress(OSError):
                stream.close()
                self.filesystem.delete_file(staged)
            raise
        self._call(stream.close)
        if self.local:
            self.filesystem.move(staged, path)

    def delete(self, path: str) -> None:
        if self.exists(path):
            self._call(self.filesystem.delete_file, path)

    def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise ServiceUnreachableError(
                f"the archive at {self.url} cannot be reached or written ({_first_line(error)}); "
                "check ARCHIVE_URL and the ARCHIVE_S3_* settings"
            ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def archive_target(settings: Settings) -> ArchiveTarget:
    """The target ARCHIVE_URL names (a person's mistake in it is one line)."""
    url = settings.archive_url.strip()
    if not url:
        return local_target(default_archive_dir())
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return s3_target(
            url,
            endpoint_url=settings.archive_s3_endpoint_url,
            region=settings.archive_s3_region,
            access_key=(
                settings.archive_s3_access_key_id.get_secret_value()
                if settings.archive_s3_access_key_id
                else None
            ),
            secret_key=(
                settings.archive_s3_secret_access_key.get_secret_value()
                if settings.archive_s3_secret_access_key
                else None
            ),
        )
    if parsed.scheme == "file":
        return local_target(Path(parsed.path))
    if parsed.scheme == "":
        return local_target(Path(url))
    raise ConfigurationError(
        f"ARCHIVE_URL: {parsed.scheme}:// is not offered (got {url!r}); give a directory, "
        "file:///path or s3://bucket/prefix"
    )


def local_target(directory: Path) -> ArchiveTarget:
    root = directory.expanduser().resolve()
    return ArchiveTarget(
        filesystem=pafs.LocalFileSystem(), root=str(root), url=str(root), local=True
    )


def s3_target(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    access_key: str | None = None,
    secret_key: str | None = None,
) -> ArchiveTarget:
    """`s3://bucket/prefix` through pyarrow's S3 client (an endpoint for a non-AWS store)."""
    parsed = urlparse(url)
    bucket = parsed.netloc
    if not bucket:
        raise ConfigurationError(f"ARCHIVE_URL: {url!r} names no bucket; give s3://bucket/prefix")
    if (access_key is None) != (secret_key is None):
        raise ConfigurationError(
            "ARCHIVE_S3_ACCESS_KEY_ID and ARCHIVE_S3_SECRET_ACCESS_KEY go together: set both "
            "or neither (then the AWS default chain is used)"
        )
    options: dict[str, Any] = {"region": region}
    if access_key is not None:
        options |= {"access_key": access_key, "secret_key": secret_key}
    if endpoint_url:
        endpoint = urlparse(endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
            raise ConfigurationError(
                f"ARCHIVE_S3_ENDPOINT_URL: {endpoint_url!r} is not an http(s) URL; give e.g. "
                "http://127.0.0.1:7070"
            )
        options |= {
            "endpoint_override": endpoint.netloc,
            "scheme": endpoint.scheme,
            # Path-style addressing: what stores other than AWS expect.
            "force_virtual_addressing": False,
        }
    # Short timeouts and few retries: an unreachable store is a one-line error, not a hang.
    options |= {
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    filesystem = pafs.S3FileSystem(**options)
    root = f"{bucket}/{parsed.path.strip('/')}".rstrip("/")
    return ArchiveTarget(filesystem=filesystem, root=root, url=url, local=False)
