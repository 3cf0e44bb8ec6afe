"""Text that leaves the program: spreadsheet cells that cannot run formulas, terminal lines that
cannot move the cursor, recolour the screen or hide what follows.

File names, class names and model messages come from the user's data; they are shown, never
interpreted.
"""
from __future__ import annotations

import os
import re
import unicodedata
from typing import Any

# OWASP "CSV injection": a cell starting with one of these is a formula to Excel, LibreOffice
# and Google Sheets (tab and CR too, since some importers strip them and read what follows).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

# Escape sequences, whole: CSI (ESC [ ... final, or the C1 byte 0x9b), OSC (ESC ] ... BEL or ST),
# DCS/SOS/PM/APC strings (ESC P/X/^/_ ... ST), and two-byte ESC sequences.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"
                      r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
                      r"|\x1b[ -/]*[0-~]?")
# Bidirectional overrides and isolates ("Trojan Source"): they reorder what the reader sees.
_BIDI = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"))


def csv_cell(value: Any) -> Any:
    """``value`` for a CSV cell: a string that a spreadsheet would read as a formula gets a leading
    apostrophe (shown as text, not run); anything else is returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def terminal(text: str) -> str:
    """``text`` safe to print: escape sequences removed whole, bidirectional controls dropped, and
    every other control character (newline and CR included, so one message stays one line)
    shown as ``\\n``, ``\\r`` or ``\\xNN``; a tab becomes a space. Bytes that are not UTF-8 (a
    file name's, surrogate-escaped by the OS) are shown as ``\\xNN`` too."""
    text = _ESCAPES.sub("", str(text)).translate(_BIDI)
    out = []
    for ch in text:
        if ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch) == "Cc":
            out.append({"\n": "\\n", "\r": "\\r"}.get(ch, f"\\x{ord(ch):02x}"))
        elif "\udc80" <= ch <= "\udcff":
            out.append(os.fsencode(ch).decode("ascii", "backslashreplace"))
        elif unicodedata.category(ch) == "Cs":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)
