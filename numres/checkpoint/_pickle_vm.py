"""A pickle interpreter that can only build data.

Python's own unpickler runs code by design: GLOBAL imports any name and REDUCE calls it. A
checkpoint downloaded from the internet is untrusted input, so numres interprets the opcode
stream itself and understands only the opcodes a state dict needs (protocols 0-2 as torch and
Python 2 wrote them, plus the framing of protocol 4). A GLOBAL resolves through an allowlist to
numres's own inert stand-ins; nothing found in a file is ever imported or called.

Everything the interpreter builds is plain data: None, bool, int, float, str, bytes, tuple,
list, dict, and whatever the allowlisted stand-ins return.
"""

import codecs
import reprlib
import struct

from ..errors import CheckpointError

# Longest text line (INT, LONG, FLOAT, GLOBAL names): int() on a huge digit string is
# quadratic, and no honest checkpoint comes close.
_MAX_LINE = 1024
# Widest LONG1/LONG4 integer, in bytes. Torch's magic number needs 10.
_MAX_LONG_BYTES = 64
# Opcodes one file may execute, over all its pickles (the TAR format has one per storage and
# tensor record). A state dict needs ~30 per tensor plus ~10 per record; this allows ~30k
# tensors and caps what a hostile stream of tiny container opcodes can allocate (~64 bytes each).
MAX_OPS = 1_000_000


class Budget:
    """The work one file may make the reader do, and what it has done so far.

    One budget is shared by every pickle of a file, so a file cannot multiply the limit by
    splitting its work into many pickles.

    Attributes:
        max_ops: opcodes that may run, over all pickles of the file.
        ops: opcodes run so far.
        bytes_read: bytes the interpreter has read from the file (it never reads a byte twice,
            so this stays below the file's size).
        headers: container headers parsed (TAR blocks), counted by the format readers.
    """

    def __init__(self, max_ops=MAX_OPS):
        self.max_ops = max_ops
        self.ops = 0
        self.bytes_read = 0
        self.headers = 0

    def __repr__(self):
        return (f"Budget(ops={self.ops}/{self.max_ops}, bytes_read={self.bytes_read}, "
                f"headers={self.headers})")


# Bounded previews of file values for error messages. A pickle can nest a tuple in itself
# through DUP or the memo (``)2\x86 2\x86 ...``): each level doubles what repr() or hash()
# walks, so an 85-byte file would cost days. reprlib stops at a depth and a width.
_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel = 3
_PREVIEW.maxtuple = _PREVIEW.maxlist = _PREVIEW.maxdict = _PREVIEW.maxset = 6
_PREVIEW.maxstring = _PREVIEW.maxother = 60
_PREVIEW.maxlong = 40
# Dict keys a state dict (or a training checkpoint around it) uses. Anything else, tuples
# above all, would be hashed, and a self-nested tuple's hash is exponential too.
KEY_TYPES = (str, int, bytes, float, bool, type(None))


def preview(value, width=80):
    """A short repr of ``value`` whose cost is bounded whatever the value (see ``_PREVIEW``)."""
    text = _PREVIEW.repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


class Global:
    """An allowlisted global name. Subclasses decide what it may be used for."""

    def __init__(self, module, name):
        self.module = module
        self.name = name

    def __repr__(self):
        return f"{self.module}.{self.name}"


class Constructor(Global):
    """An allowlisted callable: REDUCE calls ``build(args)``, numres's own function."""

    def __init__(self, module, name, build):
        super().__init__(module, name)
        self.build = build


class Marker(Global):
    """An allowlisted name that is data only (a storage or tensor type); never callable."""

    def __init__(self, module, name, payload=None):
        super().__init__(module, name)
        self.payload = payload


class StateDict(dict):
    """What ``collections.OrderedDict`` becomes; BUILD may attach torch's ``_metadata``."""

    metadata = None


class Unpickler:
    """Interpret one pickle from ``buf[start:end]``.

    Args:
        buf: a bytes-like object (bytes, memoryview, mmap).
        start, end: the byte range holding the pickle (it may be followed by other data).
        allowed: dict mapping ``(module, name)`` to a :class:`Global`.
        persistent_load: called with the persistent id; returns the object it stands for.
        source: text used in error messages, e.g. ``"model.pth: data.pkl"``.
        budget: the file's :class:`Budget` (a fresh one when omitted).

    Example:
        >>> obj, end = Unpickler(b"\\x80\\x02K\\x05.", 0, 5, {}, None, "x").load()
        >>> obj, end
        (5, 5)
    """

    def __init__(self, buf, start, end, allowed, persistent_load, source, budget=None):
        self.buf = memoryview(buf).cast("B")
        self.pos = start
        self.end = end
        self.allowed = allowed
        self.persistent_load = persistent_load
        self.source = source
        self.stack = []
        self.metastack = []
        self.memo = {}
        self.budget = budget if budget is not None else Budget()

    # -- reading -------------------------------------------------------------------------
    def _fail(self, msg):
        raise CheckpointError(f"{self.source}: {msg} (pickle byte {self.pos})")

    def _read(self, n):
        if n < 0 or self.pos + n > self.end:
            self._fail(f"needs {n} bytes but only {self.end - self.pos} remain")
        chunk = self.buf[self.pos:self.pos + n]
        self.pos += n
        self.budget.bytes_read += n
        return chunk

    def _unpack(self, fmt):
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _readline(self):
        limit = min(self.end, self.pos + _MAX_LINE)
        for i in range(self.pos, limit):
            if self.buf[i] == 0x0A:
                line = bytes(self.buf[self.pos:i])
                self.budget.bytes_read += i + 1 - self.pos
                self.pos = i + 1
                return line
        self._fail(f"text line longer than {_MAX_LINE} bytes or unterminated")

    def _decode_str8(self, raw):
        # Python 2 str: torch reads these as UTF-8; anything else is kept as latin-1 text so a
        # key never turns into bytes silently.
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("latin-1")

    # -- stack helpers -------------------------------------------------------------------
    def _pop(self):
        if not self.stack:
            self._fail("stack underflow")
        return self.stack.pop()

    def _top(self):
        if not self.stack:
            self._fail("stack underflow")
        return self.stack[-1]

    def _pop_mark(self):
        if not self.metastack:
            self._fail("MARK expected but none is open")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _push(self, obj):
        self.stack.append(obj)

    # -- main loop -----------------------------------------------------------------------
    def load(self):
        """Run until STOP. Returns ``(object, position after STOP)``."""
        dispatch = _DISPATCH
        budget = self.budget
        while True:
            if budget.ops >= budget.max_ops:
                self._fail(f"more than {budget.max_ops} opcodes in this file")
            budget.ops += 1
            if self.pos >= self.end:
                self._fail("ended without STOP")
            op = self.buf[self.pos]
            self.pos += 1
            budget.bytes_read += 1
            handler = dispatch.get(op)
            if handler is None:
                name = _OPCODE_NAMES.get(op, f"0x{op:02x}")
                self._fail(f"opcode {name} is not allowed in a checkpoint")
            if handler is _stop:
                if self.metastack or len(self.stack) != 1:
                    self._fail("STOP with a malformed stack")
                return self.stack[0], self.pos
            handler(self)

    # -- globals, calls ------------------------------------------------------------------
    def _resolve(self, module, name):
        found = self.allowed.get((module, name))
        if found is None:
            self._fail(f"refusing global '{module}.{name}': not on numres's allowlist of "
                       "state-dict types (the file may try to run code)")
        return found

    def _hashable(self, key):
        if type(key) not in KEY_TYPES:
            self._fail(f"dict key of type {type(key).__name__} is not allowed")
        return key


def _proto(u):
    version = u._read(1)[0]
    if version > 5:
        u._fail(f"unsupported pickle protocol {version}")


def _frame(u):
    u._unpack("<Q")  # frames only chunk the stream; the bytes follow in place


def _stop(u):
    pass  # handled in load()


def _mark(u):
    u.metastack.append(u.stack)
    u.stack = []


def _pop(u):
    u._pop()


def _pop_mark(u):
    u._pop_mark()


def _dup(u):
    u._push(u._top())


def _none(u):
    u._push(None)


def _newtrue(u):
    u._push(True)


def _newfalse(u):
    u._push(False)


def _int(u):
    line = u._readline()
    if line == b"01":
        u._push(True)
    elif line == b"00":
        u._push(False)
    else:
        u._push(_parse_int(u, line))


def _long(u):
    line = u._readline()
    u._push(_parse_int(u, line[:-1] if line.endswith(b"L") else line))


def _parse_int(u, text):
    try:
        return int(text)
    except ValueError:
        u._fail(f"bad integer literal {text[:40]!r}")


def _binint(u):
    u._push(u._unpack("<i"))


def _binint1(u):
    u._push(u._read(1)[0])


def _binint2(u):
    u._push(u._unpack("<H"))


def _long1(u):
    _long_n(u, u._read(1)[0])


def _long4(u):
    _long_n(u, u._unpack("<i"))


def _long_n(u, n):
    if n < 0 or n > _MAX_LONG_BYTES:
        u._fail(f"integer of {n} bytes is out of range")
    u._push(int.from_bytes(u._read(n), "little", signed=True))


def _float(u):
    line = u._readline()
    try:
        u._push(float(line))
    except ValueError:
        u._fail(f"bad float literal {line[:40]!r}")


def _binfloat(u):
    u._push(u._unpack(">d"))


def _string(u):
    line = u._readline()
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        u._fail("bad STRING literal")
    try:
        u._push(u._decode_str8(codecs.escape_decode(line[1:-1])[0]))
    except ValueError:
        u._fail("bad STRING literal")


def _binstring(u):
    u._push(u._decode_str8(u._read(u._unpack("<i"))))


def _short_binstring(u):
    u._push(u._decode_str8(u._read(u._read(1)[0])))


def _text(u, raw):
    try:
        return bytes(raw).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        u._fail("string is not valid UTF-8")


def _unicode(u):
    try:
        u._push(u._readline().decode("raw_unicode_escape"))
    except UnicodeDecodeError:
        u._fail("bad UNICODE literal")


def _binunicode(u):
    u._push(_text(u, u._read(u._unpack("<I"))))


def _short_binunicode(u):
    u._push(_text(u, u._read(u._read(1)[0])))


def _binunicode8(u):
    u._push(_text(u, u._read(u._unpack("<Q"))))


def _binbytes(u):
    u._push(bytes(u._read(u._unpack("<I"))))


def _short_binbytes(u):
    u._push(bytes(u._read(u._read(1)[0])))


def _binbytes8(u):
    u._push(bytes(u._read(u._unpack("<Q"))))


def _empty_tuple(u):
    u._push(())


def _tuple(u):
    u._push(tuple(u._pop_mark()))


def _tuple_n(n):
    def handler(u):
        if len(u.stack) < n:
            u._fail("stack underflow")
        items = tuple(u.stack[len(u.stack) - n:])
        del u.stack[len(u.stack) - n:]
        u._push(items)
    return handler


def _empty_list(u):
    u._push([])


def _list(u):
    u._push(u._pop_mark())


def _append(u):
    value = u._pop()
    target = u._top()
    if type(target) is not list:
        u._fail(f"APPEND to a {type(target).__name__}, not a list")
    target.append(value)


def _appends(u):
    items = u._pop_mark()
    target = u._top()
    if type(target) is not list:
        u._fail(f"APPENDS to a {type(target).__name__}, not a list")
    target.extend(items)


def _empty_dict(u):
    u._push({})


def _dict(u):
    items = u._pop_mark()
    if len(items) % 2:
        u._fail("DICT with an odd number of items")
    u._push({u._hashable(items[i]): items[i + 1] for i in range(0, len(items), 2)})


def _setitem(u):
    value = u._pop()
    key = u._pop()
    _set_items(u, [key, value])


def _setitems(u):
    _set_items(u, u._pop_mark())


def _set_items(u, items):
    target = u._top()
    # Only real dicts take items: SETITEM on anything else is the CVE-2026-24747 pattern.
    if type(target) not in (dict, StateDict):
        u._fail(f"SETITEM on a {type(target).__name__}, not a dict")
    if len(items) % 2:
        u._fail("SETITEMS with an odd number of items")
    for i in range(0, len(items), 2):
        target[u._hashable(items[i])] = items[i + 1]


def _get_memo(u, index):
    if index not in u.memo:
        u._fail(f"memo key {index} was never stored")
    u._push(u.memo[index])


def _get(u):
    _get_memo(u, _parse_int(u, u._readline()))


def _binget(u):
    _get_memo(u, u._read(1)[0])


def _long_binget(u):
    _get_memo(u, u._unpack("<I"))


def _put(u):
    u.memo[_parse_int(u, u._readline())] = u._top()


def _binput(u):
    u.memo[u._read(1)[0]] = u._top()


def _long_binput(u):
    u.memo[u._unpack("<I")] = u._top()


def _memoize(u):
    u.memo[len(u.memo)] = u._top()


def _global(u):
    module = u._readline().decode("utf-8", "replace")
    name = u._readline().decode("utf-8", "replace")
    u._push(u._resolve(module, name))


def _stack_global(u):
    name = u._pop()
    module = u._pop()
    if type(module) is not str or type(name) is not str:
        u._fail("STACK_GLOBAL needs two strings")
    u._push(u._resolve(module, name))


def _reduce(u):
    args = u._pop()
    func = u._pop()
    if not isinstance(func, Constructor):
        u._fail(f"REDUCE may only call allowlisted constructors, not {func!r}")
    if type(args) is not tuple:
        u._fail(f"REDUCE arguments for {func!r} are not a tuple")
    try:
        u._push(func.build(*args))
    except CheckpointError as exc:
        u._fail(f"{func!r}: {exc}")
    except TypeError:
        u._fail(f"{func!r} called with {len(args)} arguments of the wrong kind")


def _build(u):
    state = u._pop()
    target = u._top()
    # torch's OrderedDict carries its version metadata this way; nothing else may be built.
    if type(target) is not StateDict:
        u._fail(f"BUILD on a {type(target).__name__} is not allowed")
    if type(state) is not dict or not set(state) <= {"_metadata"}:
        u._fail("BUILD state other than OrderedDict metadata is not allowed")
    target.metadata = state.get("_metadata")


def _binpersid(u):
    pid = u._pop()
    if u.persistent_load is None:
        u._fail("persistent id found where none may be")
    u._push(u.persistent_load(pid))


_DISPATCH = {
    0x80: _proto, 0x95: _frame, ord("."): _stop,
    ord("("): _mark, ord("0"): _pop, ord("1"): _pop_mark, ord("2"): _dup,
    ord("N"): _none, 0x88: _newtrue, 0x89: _newfalse,
    ord("I"): _int, ord("L"): _long, ord("J"): _binint, ord("K"): _binint1,
    ord("M"): _binint2, 0x8A: _long1, 0x8B: _long4, ord("F"): _float, ord("G"): _binfloat,
    ord("S"): _string, ord("T"): _binstring, ord("U"): _short_binstring,
    ord("V"): _unicode, ord("X"): _binunicode, 0x8C: _short_binunicode, 0x8D: _binunicode8,
    ord("B"): _binbytes, ord("C"): _short_binbytes, 0x8E: _binbytes8,
    ord(")"): _empty_tuple, ord("t"): _tuple, 0x85: _tuple_n(1), 0x86: _tuple_n(2),
    0x87: _tuple_n(3), ord("]"): _empty_list, ord("l"): _list, ord("a"): _append,
    ord("e"): _appends, ord("}"): _empty_dict, ord("d"): _dict, ord("s"): _setitem,
    ord("u"): _setitems,
    ord("g"): _get, ord("h"): _binget, ord("j"): _long_binget, ord("p"): _put,
    ord("q"): _binput, ord("r"): _long_binput, 0x94: _memoize,
    ord("c"): _global, 0x93: _stack_global, ord("R"): _reduce, ord("b"): _build,
    ord("Q"): _binpersid,
}

# Names for the opcodes refused above, so the error says what the file tried.
_OPCODE_NAMES = {
    ord("i"): "INST", ord("o"): "OBJ", 0x81: "NEWOBJ", 0x92: "NEWOBJ_EX",
    0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4", ord("P"): "PERSID (text form)",
    0x8F: "EMPTY_SET", 0x90: "ADDITEMS", 0x91: "FROZENSET", 0x96: "BYTEARRAY8",
    0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER",
}
