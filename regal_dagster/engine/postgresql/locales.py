"""What a scratch cluster's template databases are initialised with: encoding, collation provider and locale.

A restore test restores a database into a scratch server initialised with that database's own encoding,
provider (libc, ICU, builtin) and locale, so that its text, its sort order and its indexes are tested as they
are on the source (a LATIN1 database cannot even be created on a server initialised for UTF-8 under C.UTF-8).
A libc locale this machine lacks is an environment problem (MissingSoftwareError) naming the locale and how to
install it: the operating system's locales are what `initdb` and the server sort with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import locale as python_locale
import re
from dataclasses import dataclass
from typing import Any

from ..errors import MissingSoftwareError

# PostgreSQL's encodings by the charmap glibc's localedef builds a locale of (for the install hint)
_CHARMAPS = {"UTF8": "UTF-8", "LATIN1": "ISO-8859-1", "LATIN2": "ISO-8859-2", "LATIN9": "ISO-8859-15",
             "EUC_JP": "EUC-JP", "EUC_KR": "EUC-KR", "EUC_CN": "GB2312", "EUC_TW": "EUC-TW", "KOI8R": "KOI8-R",
             "WIN1251": "CP1251", "WIN1252": "CP1252", "ISO_8859_5": "ISO-8859-5", "ISO_8859_7": "ISO-8859-7",
             "GB18030": "GB18030", "SJIS": "SHIFT_JIS", "BIG5": "BIG5"}
_ALWAYS_THERE = {"C", "POSIX"}


@dataclass(frozen=True)
class ClusterLocale:
    """initdb's encoding, collation provider (libc | icu | builtin) and locales. `locale` is the ICU or builtin
    locale (None for libc); `lc_collate`/`lc_ctype` are the operating system's (libc) locales every database has."""

    encoding: str = "UTF8"
    provider: str = "builtin"
    lc_collate: str = "C"
    lc_ctype: str = "C"
    locale: str | None = "C.UTF-8"
    icu_rules: str | None = None

    @classmethod
    def of_database(cls, properties: dict[str, Any]) -> ClusterLocale:
        """The locale of a backed-up database (its recorded `database_properties`)."""
        provider = properties.get("locale_provider") or "libc"
        return cls(properties["encoding"], provider, properties["lc_collate"], properties["lc_ctype"],
                   properties.get("locale") if provider != "libc" else None,
                   properties.get("icu_rules") if provider == "icu" else None)

    def describe(self) -> str:
        text = f"encoding {self.encoding}, {self.provider} provider, LC_COLLATE {self.lc_collate}, " \
               f"LC_CTYPE {self.lc_ctype}"
        return text + (f", {self.provider} locale {self.locale}" if self.locale else "")

    def initdb_args(self, major: int) -> list[str]:
        """initdb's options for this locale on a server of `major` (before 17 the builtin provider does not
        exist: its C locale is libc's C there; before 15 there is no provider at all)."""
        args = [f"--encoding={self.encoding}", "--locale=C", f"--lc-collate={self.lc_collate}",
                f"--lc-ctype={self.lc_ctype}"]
        provider = "libc" if self.provider == "builtin" and major < 17 else self.provider
        if major >= 15:
            args.append(f"--locale-provider={provider}")
        if provider == "icu":
            args.append(f"--icu-locale={self.locale}")
            if self.icu_rules and major >= 16:
                args.append(f"--icu-rules={self.icu_rules}")
        elif provider == "builtin":
            args.append(f"--builtin-locale={self.locale}")
        return args

    def check_available(self) -> None:
        """MissingSoftwareError naming each libc locale this machine lacks and how to install it."""
        missing = [name for name in dict.fromkeys((self.lc_collate, self.lc_ctype)) if not locale_available(name)]
        if not missing:
            return
        commands = "; ".join(localedef_command(name, self.encoding) for name in missing)
        raise MissingSoftwareError(
            f"this machine lacks the operating-system locale {' and '.join(missing)}, which the backed-up "
            f"database uses ({self.describe()}): a restore test runs it under its own locale, so it cannot run "
            "here (nothing is known about the backup)",
            f"install the locale ({commands}), or the distribution's locales package (Debian/Ubuntu: apt-get install "
            "locales-all; RHEL/Fedora: dnf install glibc-all-langpacks); `locale -a` lists what is installed; then "
            "run the restore test again")


@functools.cache
def locale_available(name: str) -> bool:
    """Whether the C library can load the locale `name` for LC_COLLATE and LC_CTYPE (newlocale: the process's own
    locale is not touched). True when the C library cannot be asked (initdb then says)."""
    if name in _ALWAYS_THERE:
        return True
    library = ctypes.util.find_library("c")
    if library is None:
        return True
    try:
        libc = ctypes.CDLL(library)
        newlocale, freelocale = libc.newlocale, libc.freelocale
    except (OSError, AttributeError):
        return True
    newlocale.restype = ctypes.c_void_p
    newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
    freelocale.argtypes = [ctypes.c_void_p]
    mask = (1 << python_locale.LC_COLLATE) | (1 << python_locale.LC_CTYPE)
    handle = newlocale(mask, name.encode(), None)
    if not handle:
        return False
    freelocale(handle)
    return True


def localedef_command(name: str, encoding: str) -> str:
    """The glibc command that builds the locale `name` (language_TERRITORY[.codeset][@modifier])."""
    match = re.fullmatch(r"([^.@]+)(?:\.([^@]+))?(@.+)?", name)
    if match is None:
        return f"localedef for {name}"
    language, codeset, modifier = match.group(1), match.group(2), match.group(3) or ""
    charmap = _charmap_of(codeset) if codeset else _CHARMAPS.get(encoding, encoding)
    return f"localedef -i {language}{modifier} -f {charmap} {name}"


def _charmap_of(codeset: str) -> str:
    compact = re.sub(r"[-_]", "", codeset).lower()
    if compact == "utf8":
        return "UTF-8"
    if iso := re.fullmatch(r"iso8859(\d+)", compact):
        return f"ISO-8859-{iso.group(1)}"
    if compact in ("eucjp", "euckr", "euctw"):
        return f"EUC-{compact[3:].upper()}"
    return codeset
