"""Strict reading of the UTF-8 text files users hand over (metadata CSV/JSONL, prompt files).

A file saved as UTF-16/32 or in a legacy 8-bit encoding, or a CSV with a stray double quote, is refused with a
message naming the file, the line and the fix, instead of being read as mangled text or merged rows.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterator
from pathlib import Path

from bksdm.train.data.records import DataError

CSV_ADVICE = (
    "a field that holds commas, double quotes or line breaks must be in double quotes, with each double quote "
    'inside it doubled (""), as csv writers and spreadsheets write it'
)


# Byte-order marks of the encodings a spreadsheet or an editor may save text in (UTF-32 first: its
# little-endian mark starts with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def check_utf8_start(path: Path, error: type[ValueError] = DataError) -> None:
    """Refuses a text file saved as UTF-16 or UTF-32, before its header is read as mangled column names.

    A UTF-8 byte-order mark is fine (readers strip it). UTF-16/32 are recognised by their byte-order mark, or
    without one by NUL bytes in the first line (text never holds NUL; UTF-16 puts one beside every ASCII
    character).

    Raises:
        error: Naming the file, the encoding found and how to save it as UTF-8.
    """
    with path.open("rb") as f:
        head = f.read(4096)
    for bom, name in _BOMS:
        if head.startswith(bom):
            found = f"is saved as {name} (it starts with a {name} byte-order mark)"
            break
    else:
        if b"\x00" not in head.split(b"\n", 1)[0]:
            return
        name = "UTF-16"
        found = "holds NUL bytes in its first line: it is probably saved as UTF-16 or UTF-32 without a byte-order mark"
    raise error(
        f"{path} {found}, but bksdm reads text files as UTF-8. Save it as UTF-8 (a spreadsheet's 'CSV UTF-8' "
        f"format, or: iconv -f {name} -t UTF-8 {path.name} > utf8-{path.name})"
    )


def utf8_error(path: Path, error: type[ValueError] = DataError) -> ValueError:
    """The error for a file that is not valid UTF-8: its first bad line, the byte offset and the bytes.

    Called after a decoder failed; scans the file again line by line (only on that error path).
    """
    offset = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = line[err.start : err.start + 8]
                return error(
                    f"{path}, line {number} (byte {offset + err.start}): {bad!r} is not UTF-8 text, and bksdm reads "
                    f"text files as UTF-8. Save the file as UTF-8 (from Latin-1 or Windows-1252, e.g.: iconv -f "
                    f"CP1252 -t UTF-8 {path.name} > utf8-{path.name})"
                )
            offset += len(line)
    return error(f"{path} is not UTF-8 text; save it as UTF-8")


def csv_rows(path: Path, error: type[ValueError] = DataError) -> Iterator[tuple[int, list[str]]]:
    """The records of a UTF-8 CSV file, header first, each with the line it starts on; strictly parsed.

    Python's ``csv`` module is lenient by default: an unbalanced double quote makes it read every following
    line, up to the next quote or the end of the file, into one field, and a row with a field too many or
    too few passes. Here these are errors naming the line: a quote that is never closed, text after a
    closing quote, and a row whose field count differs from the header's. Blank lines are skipped. A
    UTF-8 byte-order mark is dropped.

    Raises:
        error: An encoding that is not UTF-8, or malformed CSV; the message names the file and the line.
    """
    check_utf8_start(path, error)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        header: list[str] | None = None
        start = 1  # the line the next record starts on
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if not any(field.strip() for field in row):
                    continue  # a blank line
                if header is None:
                    header = row
                elif len(row) != len(header):
                    raise error(
                        f"{path}, line {line}: {len(row)} field{'s' if len(row) != 1 else ''}, but the header has "
                        f"{len(header)} ({','.join(header)}); {CSV_ADVICE}"
                    )
                yield line, row
        except csv.Error as err:
            if "end of data" in str(err):
                raise error(
                    f"{path}, line {start}: a double quote opened in the record that starts there is never closed "
                    f"(the field runs to the end of the file, line {reader.line_num}); {CSV_ADVICE}"
                ) from None
            if "field limit" in str(err):
                raise error(
                    f"{path}, line {start}: the record that starts there has a field longer than "
                    f"{csv.field_size_limit()} characters (by line {reader.line_num}): a double quote opened there "
                    f"and not closed?; {CSV_ADVICE}"
                ) from None
            where = f"line {reader.line_num}"
            if reader.line_num != start:
                where += f" (in the record that starts on line {start}: a double quote opened there?)"
            raise error(f"{path}, {where}: malformed CSV ({err}); {CSV_ADVICE}") from None
        except UnicodeDecodeError:
            raise utf8_error(path, error) from None
