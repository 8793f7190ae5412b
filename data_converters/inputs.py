"""The one layer of input handling every source goes through: bytes -> records -> fields.

- **bytes**: :func:`read_bytes`, :func:`read_text` and :func:`load_json` read a file whole, :func:`json_lines`
  streams a JSONL file a line at a time. A missing or unreadable file, bytes that are not UTF-8, malformed JSON,
  a number Python cannot hold or nesting it cannot follow become a :class:`ConvertError` naming the file and the
  line, column or byte: never a UnicodeDecodeError, a JSONDecodeError or a RecursionError.
- **records**: :func:`json_records` yields ``(where, raw)`` for a JSON list or JSONL file; :func:`record` turns a
  raw record into :class:`Fields` (a JSONL line is decoded there, in the worker process). A record that is not
  an object, or a line that cannot be decoded, is an error *of that record*: counted under ``--on-error skip``.
  A file-level problem (the file, or a lookup table it holds, cannot be read) stops the run.
- **fields**: :class:`Fields` gives typed access to a JSON object (strings, numbers, ids, lists, objects) whose
  errors name the source's own field path (``grounding.regions[2].bbox``, ``segmentation.counts``). Numbers are
  JSON numbers: ``"10"``, ``true`` and ``null`` are not.

Undecodable bytes in a whole-file JSON (``.json``) do not stop the run: the file is decoded with
``surrogateescape`` and only the records whose output would carry such bytes fail, when the pipeline writes them
(:func:`bad_text_field` names the field).
"""
from __future__ import annotations

import codecs
import json
import math
import pickle
from pathlib import Path

from llava_getok.messages import short

class ConvertError(ValueError):
    """Bad input: names the file and record (``where``), the source's field (None: the record or file as a
    whole) and what is wrong. ``reason`` is the short category the skip summary counts."""

    def __init__(self, where: str, field: str | None, message: str, reason: str | None = None):
        self.where, self.field, self.message = where, field, message
        self.reason = reason or (f"bad {field}" if field else "bad record")
        super().__init__(f"{where}: field {field!r}: {message}" if field else f"{where}: {message}")

    def __reduce__(self):  # picklable: read() hands a broken record to a worker, to be counted there
        return (type(self), (self.where, self.field, self.message, self.reason))


class Filtered(Exception):
    """A record deliberately left out (e.g. a COCO crowd region for REC); counted, never an error. ``reason`` is
    what the summary counts; ``field`` and ``message`` (default: the reason) say which of the record's fields and
    why, in the rejects file."""

    def __init__(self, reason: str, field: str | None = None, message: str | None = None):
        self.reason, self.field, self.message = reason, field, message or reason
        super().__init__(self.message)

    def __reduce__(self):
        return (type(self), (self.reason, self.field, self.message))


def json_type(value) -> str:
    """The JSON name of a decoded value's type, for messages ("a string", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# -- bytes ----------------------------------------------------------------------------------------------------

def _file_error(path, e: OSError) -> ConvertError:
    """A file that cannot be opened or read, named."""
    if isinstance(e, FileNotFoundError):
        return ConvertError(str(path), None, "file not found", "missing file")
    if isinstance(e, IsADirectoryError):
        return ConvertError(str(path), None, "is a folder, expected a file", "missing file")
    return ConvertError(str(path), None, f"cannot read: {e.strerror or e}", "unreadable file")


def read_bytes(path) -> bytes:
    """The whole file; a missing, unreadable or folder path is a ConvertError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise _file_error(path, e) from None


def _not_utf8(data: bytes, e: UnicodeDecodeError, where: str, whole_file: bool) -> ConvertError:
    line = data.count(b"\n", 0, e.start) + 1
    at = f"line {line}, byte {e.start}" if whole_file else f"column {e.start + 1}"
    return ConvertError(where, None, f"not UTF-8 text: byte 0x{data[e.start]:02x} at {at}", "not UTF-8")


def read_text(path) -> str:
    """A whole text file as UTF-8 (a leading byte-order mark is dropped); other bytes are a ConvertError naming
    the line and byte."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(data, e, str(path), True) from None


def parse_json(text: str, where: str, one_line: bool = False):
    """``json.loads`` whose every failure is a ConvertError: malformed JSON (line and column; the column alone
    for a JSONL line), an integer of more than 4300 digits (Python's limit), nesting deeper than Python's
    recursion limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.pos + 1}" if one_line else f"line {e.lineno}, column {e.colno}"
        raise ConvertError(where, None, f"malformed JSON at {at}: {e.msg}", "malformed JSON") from None
    except ValueError as e:  # json.loads' int() refuses more than sys.get_int_max_str_digits() digits
        raise ConvertError(where, None, f"malformed JSON: {str(e).split(';')[0]}", "malformed JSON") from None
    except RecursionError:
        raise ConvertError(where, None, "malformed JSON: nested deeper than Python can read", "malformed JSON") from None


def load_json(path):
    """A whole JSON file -> its value. The encoding is detected as ``json.loads`` does for bytes (UTF-8 with or
    without a byte-order mark, UTF-16, UTF-32); UTF-8 bytes that do not decode are kept as lone surrogates
    (``surrogateescape``), so one bad byte costs only the records that carry it (see the module docstring)."""
    data = read_bytes(path)
    encoding = json.detect_encoding(data)
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        if not encoding.startswith("utf-8"):
            raise _not_utf8(data, e, str(path), True) from None
        text = data.decode(encoding, "surrogateescape")
    return parse_json(text, str(path))


def json_lines(path):
    """Yield ``(where, line)`` for every non-blank line of a JSONL file, ``where`` = "NAME:LINE"; JSON is decoded
    later, by :func:`record`, in the worker. A line that is not UTF-8 is yielded as its ConvertError (counted);
    a missing or unreadable file raises one (that stops the run)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _file_error(path, e) from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if n == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8):]
                if not line.strip():
                    continue
                where = f"{path.name}:{n}"
                try:
                    yield where, line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, _not_utf8(line, e, where, False)
        except OSError as e:  # reading a folder fails here, not at open()
            raise _file_error(path, e) from None


# -- records --------------------------------------------------------------------------------------------------

def json_records(path):
    """Yield ``(where, raw)`` for JSONL (``.jsonl``, streamed; raw is the line) or a JSON list (anything else,
    loaded whole; ``where`` = "NAME:INDEX")."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from json_lines(path)
        return
    data = load_json(path)
    if not isinstance(data, list):
        raise ConvertError(str(path), None, f"expected a JSON list of records, got {json_type(data)}", "not a list")
    for n, rec in enumerate(data):
        yield f"{path.name}:{n}", rec


def numbered_records(opts):
    """The ``read`` of sources whose input is one JSON list / JSONL of records: ``(where, (index, raw))``, the
    index naming records that carry no id of their own."""
    for n, (where, raw) in enumerate(json_records(opts.input)):
        yield where, (n, raw)


def record(raw, where: str) -> "Fields":
    """A raw record as read() yielded it -> :class:`Fields`. A JSONL line is decoded here; an error or skip that
    read() handed over (a ConvertError / Filtered instead of a record) is raised here, to be counted."""
    if isinstance(raw, (ConvertError, Filtered)):
        raise raw
    if isinstance(raw, str):
        raw = parse_json(raw, where, one_line=True)
    return Fields(raw, where)


# The pickle opcodes of plain data (lists, dicts, tuples, sets, strings, bytes, numbers, None, booleans, the memo):
# no opcode that imports, calls or builds an object, and none that refers outside the file.
PLAIN_PICKLE_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP INT BININT BININT1 BININT2 LONG LONG1 LONG4 STRING BINSTRING
    SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8 NONE NEWTRUE NEWFALSE UNICODE SHORT_BINUNICODE
    BINUNICODE BINUNICODE8 FLOAT BINFLOAT EMPTY_LIST APPEND APPENDS LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3
    EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT
    MEMOIZE""".split())


def load_pickle(path):
    """A pickle of plain data (the refer toolkit's refs files), Python 2 strings read as latin-1 as the toolkit's
    own loader does. Every opcode is checked first (``pickletools.genops``, which runs nothing and reads no
    length the file does not hold): a pickle that names a class or function, or a corrupt one, is a ConvertError
    naming the file, never code run or memory claimed for a length a flipped byte made up."""
    import io
    import pickletools

    data = read_bytes(path)
    try:
        for op, _, pos in pickletools.genops(data):
            if op.name not in PLAIN_PICKLE_OPCODES:
                raise ConvertError(str(path), None, f"pickle opcode {op.name} at byte {pos}: only plain data is read "
                                   "(lists, dicts, strings, numbers)", "unreadable pickle")
        return pickle.Unpickler(io.BytesIO(data), encoding="latin1").load()
    except ConvertError:
        raise
    except RecursionError:
        raise ConvertError(str(path), None, "cannot unpickle: nested deeper than Python can read", "unreadable pickle") from None
    except Exception as e:  # a corrupt pickle fails in many ways (ValueError, UnpicklingError, EOFError, KeyError, ...)
        raise ConvertError(str(path), None, f"cannot unpickle: {type(e).__name__}: {e}", "unreadable pickle") from None


def lookup(table, key: str, where: str, field: str) -> dict:
    """``{entry[key]: Fields(entry)}`` for a lookup table of the input (COCO ``images``, ``categories``): every
    entry must be an object with a distinct ``key``; a table that breaks this is a file-level ConvertError
    (the records that use it cannot be trusted)."""
    if not isinstance(table, list):
        raise ConvertError(where, field, f"expected a list, got {json_type(table)}", f"bad {field}")
    out = {}
    for k, entry in enumerate(table):
        f = Fields(entry, where, f"{field}[{k}]")
        value = f.ident(key)
        if value in out:
            raise ConvertError(where, f.name(key), f"{key} {short(value)} repeats an earlier entry", f"duplicate {key}")
        out[value] = f
    return out


# -- fields ---------------------------------------------------------------------------------------------------

def as_key(value):
    """``value`` when it can be an identifier to join on (a string or an integer, not a boolean), else None:
    read() joins tables in the main process and must not trip over an unhashable or boolean id."""
    return value if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)) else None


def is_number(v) -> bool:
    """A JSON number (bool is an int subclass in Python, and not a number in JSON)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_NUMBER_TYPES = frozenset((int, float))  # exact types: bool (an int subclass in Python) is not a JSON number


def check_numbers(values, n: int | None, where: str, field: str) -> list[float]:
    """A list of ``n`` finite JSON numbers (any length when n is None) -> floats, else ConvertError naming the
    field (``"10"``, ``true``, NaN, infinity and numbers beyond a float are refused). Runs once per box of a
    million-record conversion: exact type tests, no per-value function calls."""
    if type(values) not in (list, tuple):
        raise ConvertError(where, field, f"expected a list of numbers, got {json_type(values)} {short(values)}", f"bad {_leaf(field)}")
    if n is not None and len(values) != n:
        raise ConvertError(where, field, f"expected {n} numbers, got {len(values)}: {short(list(values))}", f"bad {_leaf(field)}")
    for v in values:
        if type(v) not in _NUMBER_TYPES:
            raise ConvertError(where, field, f"expected numbers, got {short(list(values))}", f"bad {_leaf(field)}")
    try:
        out = [float(v) for v in values]
    except OverflowError:  # an integer beyond a float's range
        out = [math.inf]
    for v in out:
        if not math.isfinite(v):
            raise ConvertError(where, field, f"coordinates must be finite, got {short(list(values))}", "NaN or infinite coordinate")
    return out


def _leaf(field: str) -> str:
    """The last name of a field path: "grounding.regions[1].bbox" -> "bbox" (what skip reasons count)."""
    return field.rsplit(".", 1)[-1].split("[")[0]


class Fields:
    """A JSON object of the input and where it came from: typed access whose errors name the source's own field
    path (``path`` + key), never a KeyError or TypeError. Missing and ``null`` are the same ("missing")."""

    __slots__ = ("obj", "where", "path")

    def __init__(self, obj, where: str, path: str = ""):
        if not isinstance(obj, dict):
            raise ConvertError(where, path or None, f"expected a JSON object, got {json_type(obj)}",
                               f"{path.split('[')[0].rsplit('.', 1)[-1]} is not an object" if path else "record is not an object")
        self.obj, self.where, self.path = obj, where, path

    def name(self, key: str) -> str:
        """The source's name of ``key`` here: "grounding.regions[2].bbox"."""
        return f"{self.path}.{key}" if self.path else key

    def error(self, key, message, reason=None) -> ConvertError:
        return ConvertError(self.where, self.name(key) if key is not None else (self.path or None), message, reason)

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def _value(self, key, optional):
        v = self.obj.get(key)
        if v is None and not optional:
            raise self.error(key, "missing", f"missing {key}")
        return v

    def _typed(self, key, optional, ok, what):
        v = self._value(key, optional)
        if v is not None and not ok(v):
            raise self.error(key, f"expected {what}, got {json_type(v)} {short(v)}", f"bad {key}")
        return v

    def raw(self, key: str, optional: bool = False):
        """The value as the JSON holds it (the caller checks it)."""
        return self._value(key, optional)

    def string(self, key: str, optional: bool = False) -> str | None:
        """A string; one holding a NUL character is refused (never in real text, and the converters' own
        placeholders are made of them), and so is one that is not UTF-8."""
        v = self.obj.get(key)
        if type(v) is not str:  # the common case first: this runs for every turn of a million records
            return self._typed(key, optional, lambda v: isinstance(v, str), "a string")
        if "\x00" in v:
            raise self.error(key, "NUL character (U+0000) in the text", "NUL character")
        if not v.isascii():
            self._check_utf8(key, v)
        return v

    def _check_utf8(self, key, v: str) -> None:
        """Text the input's bytes could not give as UTF-8 (kept as lone surrogates) is refused where it is read."""
        if not_utf8(v):
            raise self.error(key, "text that is not UTF-8 (undecodable bytes, or a lone surrogate)", "not UTF-8")

    def number(self, key: str, optional: bool = False) -> float | None:
        v = self._typed(key, optional, is_number, "a number")
        return None if v is None else check_numbers([v], 1, self.where, self.name(key))[0]

    def ident(self, key: str, optional: bool = False):
        """An identifier: a string or an integer (not a boolean, a float or null)."""
        v = self._typed(key, optional, lambda v: as_key(v) is not None, "a string or an integer")
        if isinstance(v, str) and not v.isascii():
            self._check_utf8(key, v)
        return v

    def array(self, key: str, optional: bool = False) -> list | None:
        return self._typed(key, optional, lambda v: isinstance(v, list), "a list")

    def numbers(self, key: str, n: int | None) -> list[float]:
        return check_numbers(self._value(key, False), n, self.where, self.name(key))

    def object(self, key: str, optional: bool = False) -> "Fields | None":
        v = self._value(key, optional)
        return None if v is None else Fields(v, self.where, self.name(key))

    def optional_size(self, wkey: str = "width", hkey: str = "height") -> tuple[float, float] | None:
        """(width, height) when the object states both (numbers), else None: the size then comes from the image
        header."""
        w, h = self.number(wkey, optional=True), self.number(hkey, optional=True)
        return None if w is None or h is None else (w, h)

    def moved(self, where: str) -> "Fields":
        """The same object, its errors naming another record (a lookup-table entry used by a record)."""
        return Fields(self.obj, where, self.path)

    def texts(self, key: str, field: str) -> list[tuple[int, dict, str]]:
        """``(k, item, item[field])`` for every item of the list ``key``, each an object holding a string ``field``
        (a conversation's turns and their values), checked as :meth:`string` checks it. The same checks as
        :meth:`objects` + :meth:`string`, without an object per item: this runs for every turn of a million
        records."""
        out = []
        for k, item in enumerate(self.array(key) or ()):
            v = item.get(field) if type(item) is dict else None
            if type(v) is not str or "\x00" in v or not v.isascii():
                v = Fields(item, self.where, f"{self.name(key)}[{k}]").string(field)  # raises, or a checked non-ASCII text
            out.append((k, item, v))
        return out

    def objects(self, key: str, optional: bool = False) -> list["Fields"]:
        """Every element of the list ``key``, each an object (its errors name ``key[k]``)."""
        items = self.array(key, optional) or []
        return [Fields(v, self.where, f"{self.name(key)}[{k}]") for k, v in enumerate(items)]


def field_holding(raw, bad) -> str | None:
    """The field path of the first string (or key) of a raw record for which ``bad(text)`` holds, or None. ``raw``
    as read() yielded it: an object, a JSONL line, or :func:`numbered_records`' (index, raw); a source's own join
    of several tables is not searched (its sources read their strings through :meth:`Fields.string`, which
    checks them). For naming the field of a bad record only: it walks the whole record."""
    if isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[0], int):
        raw = raw[1]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            return None

    def walk(value, path):
        if isinstance(value, str):
            return (path or None) if bad(value) else None
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            sub = f"{path}[{k}]" if isinstance(k, int) else (f"{path}.{k}" if path else k)
            if isinstance(k, str) and bad(k):
                return sub
            found = walk(v, sub)
            if found:
                return found
        return None

    try:
        return walk(raw, "")
    except RecursionError:
        return None


def not_utf8(text: str) -> bool:
    """Whether ``text`` cannot be written as UTF-8 (lone surrogates: undecodable input bytes, ``\\udXXX`` escapes)."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
