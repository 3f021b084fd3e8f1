"""A bundle as one file for a rollout (issue 16): the hub packs it (`edgekit deploy`), serves it at
/bundles/..., and the device unpacks it into its bundle store; and a bundle's version, the name both sides give
it. One pack and one unpack, here. Standard library only; must not import paho, onnxruntime or torch.

    version   the first 16 hex digits of sha256(manifest.json): manifest.json lists every other file's sha256,
              so the version names the whole bundle (manifest.sig aside: a signature adds no content)
    archive   an uncompressed POSIX tar of the bundle's regular files, sorted by path, with zeroed owners and
              times, so one bundle always packs to the same bytes (the sha256 in the bundle command)

`unpack` extracts by hand, not with tarfile's extract: a member must be a regular file under a plain relative
path (no '..', no absolute path, no link, no device), at most MAX_FILES of them and `max_bytes` in all; an
archive that breaks a rule is refused whole, naming the member, before anything is written outside `into`.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path, PurePosixPath

from edgekit.errors import DataError

MANIFEST = "manifest.json"  # manifest.MANIFEST_FILE (the contract layer imports no sibling's constants)
VERSION_HEX = 16  # 64 bits: no two bundles of one fleet share a version in practice
MAX_FILES = 256  # a bundle holds a dozen files; a tar of thousands is not one
MAX_BYTES = 512 * 1024 * 1024  # default bound on the unpacked size (models, heldout.npz)


def version_of(manifest_bytes: bytes) -> str:
    """A bundle's version from its manifest.json's exact bytes."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:VERSION_HEX]


def bundle_version(bundle: Path) -> str:
    """The version of the bundle directory `bundle` (DataError naming manifest.json when it is missing)."""
    path = Path(bundle) / MANIFEST
    try:
        return version_of(path.read_bytes())
    except FileNotFoundError:
        raise DataError("manifest.json is missing", where=str(path)) from None


def pack(bundle: Path) -> bytes:
    """The bundle directory's regular files as a deterministic tar (sorted, owners and times zeroed)."""
    bundle = Path(bundle)
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and not p.is_symlink())
    if not any(p.relative_to(bundle).as_posix() == MANIFEST for p in files):
        raise DataError("manifest.json is missing: not a bundle directory", where=str(bundle))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(bundle).as_posix())
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _member_path(name: str, where: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")) \
            or "\\" in name or "\x00" in name:
        raise DataError(f"archive member {name!r:.120} is not a plain relative path", where=where)
    return path


def unpack(archive: Path, into: Path, *, max_bytes: int = MAX_BYTES) -> list[str]:
    """Extract the bundle archive `archive` into the new directory `into` (which must not exist); returns the
    member paths. DataError naming the archive and the member for anything but plain files under relative
    paths, more than MAX_FILES members or `max_bytes` in all, a path twice, or no manifest.json; `into` is then
    removed again."""
    import shutil

    where = str(archive)
    into = Path(into)
    into.mkdir(parents=True)
    names: list[str] = []
    total = 0
    try:
        try:
            with tarfile.open(archive, mode="r:") as tar:
                for member in tar:
                    path = _member_path(member.name, where)
                    if not member.isreg():
                        raise DataError(f"archive member {member.name!r:.120} is not a regular file", where=where)
                    total += member.size
                    if len(names) >= MAX_FILES or total > max_bytes:
                        raise DataError(f"archive holds more than {MAX_FILES} files or {max_bytes} bytes",
                                        where=where)
                    if member.name in names:
                        raise DataError(f"archive member {member.name!r:.120} appears twice", where=where)
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file always has a body
                    target = into.joinpath(*path.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        with source, open(target, "xb") as fh:
                            shutil.copyfileobj(source, fh)
                    except OSError as exc:  # "a" as a file, then "a/b"
                        raise DataError(f"archive member {member.name!r:.120} cannot be written: {exc.strerror}",
                                        where=where) from None
                    names.append(member.name)
        except (tarfile.TarError, EOFError) as exc:
            raise DataError(f"not a bundle archive: {exc}", where=where) from None
        if MANIFEST not in names:
            raise DataError("archive holds no manifest.json: not a bundle", where=where)
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    return names
