"""The one way the package reads a file: regular files only, bounded bytes and nesting, one-line errors naming it.

Every TOML, JSON and image the package reads (trainer and dataset configs, VAE and scheduler `config.json`,
safetensors indexes, state files) comes through here, as does every check of a path a user named. A FIFO is never
opened for reading in a way that blocks, `/dev/zero` is never read, a size is checked before the bytes are read, a
parser never sees more than MAX_DEPTH levels of nesting, and every OSError becomes one line with the path.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Iterable

from lpl_plugin.settings.errors import FileError
from lpl_plugin.settings.messages import show_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# Largest TOML or JSON config read (real trainer, dataset, VAE and scheduler configs are a few kB).
MAX_CONFIG_BYTES = 1 << 20
# Deepest nesting of tables/arrays accepted (sd-scripts dataset configs reach 4; JSON configs 2 or 3).
MAX_DEPTH = 32
# Largest image file read, and most pixels decoded (8192 x 8192; PIL's own bomb limit is about 89 million).
MAX_IMAGE_BYTES = 256 << 20
MAX_IMAGE_PIXELS = 8192 * 8192
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device (like /dev/zero)"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))
_REASONS = {
    errno.ENOENT: "not found; check the path (relative paths start at the current directory)",
    errno.ENOTDIR: "a part of the path before the last name is a file, not a folder",
    errno.ELOOP: "too many levels of symbolic links (a symbolic link loop)",
    errno.ENAMETOOLONG: "the path, or one name in it, is too long for this system",
    errno.EACCES: "not readable (permission denied); check the file's permissions",
    errno.EPERM: "not readable (operation not permitted); check the file's permissions",
    errno.EISDIR: "is a directory, expected a file",
}
# Lexical tokens that matter for nesting: strings and comments are skipped, brackets and dotted-key dots counted.
_TOML_TOKENS = re.compile(r'"""(?:[^"\\]|\\.|"(?!""))*"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*'
                          r"|[\[\]{}\n]|[A-Za-z0-9_+\-.:]+", re.S)
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_DECIMAL = re.compile(r"[0-9_]\.[0-9]")
_LONG_NUMBER = re.compile(r"[0-9_]{4000,}")


def reason(error: BaseException) -> str:
    """What an OSError (or a path the OS refused: NUL byte, unencodable name) means, in a few words."""
    if isinstance(error, OSError) and error.errno in _REASONS:
        return _REASONS[error.errno]
    if isinstance(error, OSError):
        return (error.strerror or type(error).__name__).lower()
    if isinstance(error, ValueError) and "null" in str(error):
        return "the path contains a NUL character"
    if isinstance(error, TypeError):
        return "not a path (expected text)"
    return f"not a usable path ({type(error).__name__})"


def path_stat(path: str | os.PathLike[str]) -> os.stat_result:
    """os.stat of a path (symbolic links followed); FileError in one line when it cannot be reached."""
    try:
        return os.stat(path)
    except (OSError, ValueError, TypeError) as error:
        raise FileError(show_path(path), reason(error), getattr(error, "errno", None)) from None


def is_dir(path: Any) -> bool:
    """Whether a path is an existing directory; False for anything unreachable (never raises)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError, TypeError):
        return False


def is_file(path: Any) -> bool:
    """Whether a path is an existing regular file; False for anything else, FIFOs and devices included."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError, TypeError):
        return False


def _not_regular(mode: int, what: str) -> str | None:
    """Why a file of this mode is refused, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, name in _KINDS:
        if test(mode):
            return f"is {name}, not a regular file; expected {what}"
    return f"is not a regular file; expected {what}"


def _size(count: int) -> str:
    """A byte count for people."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def read_bytes(path: str | os.PathLike[str], *, limit: int = MAX_CONFIG_BYTES, what: str = "a file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; FileError (one line, naming the path) otherwise."""
    shown = show_path(path)
    found = path_stat(path)
    refused = _not_regular(found.st_mode, what)
    if refused:
        raise FileError(shown, refused)
    if found.st_size > limit:
        raise FileError(shown, f"is {_size(found.st_size)}, more than the {_size(limit)} read from {what}")
    try:
        fd = os.open(path, _READ_FLAGS)
    except (OSError, ValueError) as error:
        raise FileError(shown, reason(error), getattr(error, "errno", None)) from None
    try:
        refused = _not_regular(os.fstat(fd).st_mode, what)  # swapped for something else since the stat
        if refused:
            raise FileError(shown, refused)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as error:
        raise FileError(shown, f"could not be read ({reason(error)})") from None
    finally:
        os.close(fd)
    if total > limit:
        raise FileError(shown, f"grew beyond the {_size(limit)} read from {what} while being read")
    return b"".join(chunks)


def read_text(path: str | os.PathLike[str], *, limit: int = MAX_CONFIG_BYTES, what: str = "a text file") -> str:
    """A regular UTF-8 text file (see read_bytes); FileError naming the first byte that is not UTF-8."""
    data = read_bytes(path, limit=limit, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FileError(show_path(path), f"is not UTF-8 text (byte {error.start}); save it as UTF-8") from None


# -- nesting ------------------------------------------------------------------------------------------------------

def data_depth(data: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of parsed data (dicts and lists), counted without recursion; stops at limit + 1.

    A mapping that contains itself counts as deeper than any limit.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _lexical_depth(text: str, tokens: re.Pattern[str]) -> int:
    """How deep a TOML or JSON text nests: open brackets/braces, plus the dots of one line's dotted keys (TOML)."""
    depth = deepest = dots = 0
    for match in tokens.finditer(text):
        token = match.group()
        first = token[0]
        if first in "[{":
            depth += 1
        elif first in "]}":
            depth = max(0, depth - 1)
        elif first == "\n":
            dots = 0
        elif first not in "\"'#" and "." in token:
            count = token.count(".")
            dots += 0 if count == 1 and _DECIMAL.search(token) else count  # 1.5 and 07:32:00.99 are no keys
        deepest = max(deepest, depth + dots)
    return deepest


def _too_deep(source: str, depth: int) -> FileError:
    """The one-line error for data nested beyond MAX_DEPTH."""
    return FileError(source, f"nests tables or arrays {depth} levels deep (at most {MAX_DEPTH} are read); "
                     "flatten the file")


def _long_number(source: str, text: str) -> FileError:
    """The one-line error for a number too long to convert (Python refuses over 4300 digits)."""
    found = _LONG_NUMBER.search(text)
    where = f":{text.count(chr(10), 0, found.start()) + 1}" if found else ""
    size = f" of {len(found.group())} digits" if found else ""
    return FileError(f"{source}{where}", f"a number{size} is too long to read; write it with at most a few digits")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """TOML text as data, nesting bounded before and after parsing; tomllib.TOMLDecodeError passes through.

    Everything else a parser can raise (RecursionError, ValueError for a 5,000-digit number) becomes FileError.
    """
    depth = _lexical_depth(text, _TOML_TOKENS)
    if depth > MAX_DEPTH:
        raise _too_deep(source, depth)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise
    except RecursionError:
        raise _too_deep(source, MAX_DEPTH + 1) from None
    except ValueError as error:
        if "digits" in str(error):
            raise _long_number(source, text) from None
        raise FileError(source, f"malformed TOML ({type(error).__name__})") from None
    depth = data_depth(data)
    if depth > MAX_DEPTH:
        raise _too_deep(source, depth)
    return data


def parse_json(text: str, source: str) -> Any:
    """JSON text as data, nesting bounded before parsing; FileError in one line for anything malformed."""
    depth = _lexical_depth(text, _JSON_TOKENS)
    if depth > MAX_DEPTH:
        raise _too_deep(source, depth)
    try:
        return json.loads(text)
    except RecursionError:
        raise _too_deep(source, MAX_DEPTH + 1) from None
    except json.JSONDecodeError as error:
        raise FileError(f"{source}:{error.lineno}:{error.colno}", f"malformed JSON: {error.msg}") from None
    except ValueError as error:
        if "digits" in str(error):
            raise _long_number(source, text) from None
        raise FileError(source, f"malformed JSON ({type(error).__name__})") from None


def read_json(path: str | os.PathLike[str], *, limit: int = MAX_CONFIG_BYTES, what: str = "a JSON file") -> Any:
    """A regular, bounded UTF-8 JSON file as data (see read_bytes and parse_json)."""
    return parse_json(read_text(path, limit=limit, what=what), show_path(path))


def read_json_object(path: str | os.PathLike[str], *, limit: int = MAX_CONFIG_BYTES,
                     what: str = "a JSON file") -> dict[str, Any]:
    """read_json for files that must hold one JSON object ({...})."""
    data = read_json(path, limit=limit, what=what)
    if not isinstance(data, dict):
        raise FileError(show_path(path), f"holds a JSON {type(data).__name__}, expected an object {{...}}")
    return data


# -- images ---------------------------------------------------------------------------------------------------------

def open_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_IMAGE_PIXELS,
               limit: int = MAX_IMAGE_BYTES) -> Any:
    """A decoded PIL image, its size read from the header and checked before any pixel is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    shown = show_path(path)
    data = read_bytes(path, limit=limit, what="an image file")
    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise FileError(shown, f"declares {width}x{height} pixels, more than the {max_pixels:,} decoded "
                                "(a decompression bomb, or an image to downscale first)")
            image.load()
    except FileError:
        raise
    except bomb:
        raise FileError(shown, f"declares more than the {max_pixels:,} pixels decoded (a decompression bomb, or "
                        "an image to downscale first)") from None
    except UnidentifiedImageError:
        raise FileError(shown, "not a readable image (no format Pillow reads: PNG, JPEG, WebP, ...)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        raise FileError(shown, f"not a readable image: it could not be decoded ({type(error).__name__}); it may be "
                        "truncated or corrupt") from None
    return image


# -- outputs --------------------------------------------------------------------------------------------------------

def check_output(path: str | os.PathLike[str], suffixes: Iterable[str], *, option: str = "--out") -> Path:
    """Refuse, before any work, an output path with an unknown extension, a missing or read-only folder, or one
    that exists as something other than a regular file."""
    out = Path(path)
    shown = f"{option} {show_path(path)}"
    allowed = tuple(suffixes)
    if out.suffix.lower() not in allowed:
        raise FileError(shown, f"unknown extension {show_path(out.suffix) or '(none)'}; use one of "
                        f"{', '.join(allowed)}")
    folder = out.parent if str(out.parent) else Path(".")
    found = path_stat(folder)
    if not stat.S_ISDIR(found.st_mode):
        raise FileError(shown, f"{show_path(folder)} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileError(shown, f"folder {show_path(folder)} is not writable")
    try:
        target = os.stat(out)
    except FileNotFoundError:
        return out
    except (OSError, ValueError) as error:
        raise FileError(shown, reason(error)) from None
    refused = _not_regular(target.st_mode, "a file to write")
    if refused:
        raise FileError(shown, f"exists and {refused}")
    return out


def write_bytes(path: str | os.PathLike[str], data: bytes, *, option: str = "--out") -> None:
    """Write a file whole or not at all (a temporary file beside it, then renamed); FileError when it fails."""
    out = Path(path)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        if os.path.lexists(partial):  # left by a killed run with the same process id
            os.unlink(partial)
        with os.fdopen(os.open(partial, flags, 0o666), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, out)
    except (OSError, ValueError) as error:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise FileError(f"{option} {show_path(path)}", f"could not be written ({reason(error)})") from None
