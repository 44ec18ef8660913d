"""Media folders as the local store writes them (blobs, thumbnails, DEPLOYMENT), made with the real
LocalImageStore and real images: the source of the copy tests (test_transfer.py, tests/admin/)."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from demo.common.images.local_store import LocalImageStore
from demo.common.images.storage import ImageStore, object_name
from tests.common.images.support import encode, gradient, noise, png

Key = tuple[str, int | None]  # (sha256, width): a blob (None) or one of its thumbnails


@dataclass
class MediaFolder:
    root: Path
    identity: str
    objects: dict[Key, bytes]  # what the folder holds, blobs first

    @property
    def blobs(self) -> list[str]:
        return [sha256 for sha256, width in self.objects if width is None]

    def path(self, sha256: str, width: int | None = None) -> Path:
        return self.root / object_name(sha256, width)

    def assert_copied_to(self, store: ImageStore) -> None:
        """Every object of the folder is in ``store``, byte for byte."""
        for (sha256, width), data in self.objects.items():
            assert store.read(sha256, width) == data, object_name(sha256, width)


def put_file(store: ImageStore, data: bytes, *, sha256: str | None = None, width: int | None = None) -> str:
    """Put ``data`` into ``store`` as the blob of its hash (or ``sha256``'s thumbnail of ``width``)."""
    sha256 = sha256 or hashlib.sha256(data).hexdigest()
    fd, temp = store.temp_file()
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    store.put(sha256, temp, content_type="image/png", width=width)
    return sha256


def media_folder(root: Path, *, images: int = 3, big: bool = False) -> MediaFolder:
    """A bound folder of ``images`` PNGs, each with two thumbnails; ``big`` adds a blob of several
    MiB (random pixels), larger than the copy's read size, so that it streams in pieces."""
    store = LocalImageStore(str(root))
    identity = store.claim_identity(uuid.uuid4().hex)
    objects: dict[Key, bytes] = {}
    pictures = [png((60 + 10 * i, 40 + i)) for i in range(images)]
    if big:
        pictures.append(encode(noise((1200, 1000)), "PNG"))
    for data in pictures:
        objects[(put_file(store, data), None)] = data
    for i, (sha256, _) in enumerate(list(objects)):
        for width in (16, 32):
            thumbnail = encode(gradient((width, width // 2 + i)), "PNG")
            put_file(store, thumbnail, sha256=sha256, width=width)
            objects[(sha256, width)] = thumbnail
    return MediaFolder(root, identity, objects)
