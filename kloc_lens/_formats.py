"""Format tags of the files kloc_lens writes: ``"<name>/<version>"`` in a file's metadata.

Every saved file carries the name of its format and the version of its layout, so that a reader
refuses a file of another kind, or one written by a newer kloc_lens, with a named error instead of
a ``KeyError`` halfway through (or, worse, a silent misreading).

>>> from kloc_lens.errors import ResultError
>>> tag("kloc_lens.result", 1)
'kloc_lens.result/1'
>>> read_tag("kloc_lens.result/1", "kloc_lens.result", 1, "'x.safetensors'", ResultError)
1
>>> read_tag("kloc_lens.result/3", "kloc_lens.result", 1, "'x.safetensors'", ResultError)
Traceback (most recent call last):
...
kloc_lens.errors.ResultError: 'x.safetensors' is kloc_lens.result format version 3, newer than
this kloc_lens reads (up to 1): upgrade kloc_lens to read it
"""

from __future__ import annotations

from kloc_lens.errors import KlocLensError

__all__ = ["read_tag", "tag"]


def tag(name: str, version: int) -> str:
    """The tag written into a file of format ``name`` at layout ``version``."""
    return f"{name}/{version}"


def read_tag(
    found: object, name: str, version: int, source: str, error: type[KlocLensError]
) -> int:
    """The layout version of a file whose metadata carries the tag ``found``.

    Args:
        found: The tag read from the file.
        name: The format expected (``"kloc_lens.result"``).
        version: The newest layout this kloc_lens reads.
        source: The file, as it should appear in messages.
        error: The error class to raise.

    Raises:
        KlocLensError: (``error``) The tag is malformed, names another format, or a version newer
            than ``version``.
    """
    if not isinstance(found, str) or "/" not in found:
        raise error(f"{source} carries the format tag {found!r}, expected '{name}/<version>'")
    found_name, _, found_version = found.rpartition("/")
    if found_name != name:
        raise error(f"{source} is a {found_name!r} file, not a {name!r} file")
    if not found_version.isdigit() or int(found_version) < 1:
        raise error(
            f"{source} has {name} format version {found_version!r}; expected a positive integer"
        )
    if int(found_version) > version:
        raise error(
            f"{source} is {name} format version {found_version}, newer than this kloc_lens reads "
            f"(up to {version}): upgrade kloc_lens to read it"
        )
    return int(found_version)
