"""One reading of every domain (DESIGN §2.6).

The proxy relays bytes as received, so the backend reads every domain itself.  A domain the
proxy judges (`<db:result from>`), compares (a stanza's `from`/`to` against the authenticated
pairs) or lets through (`<db:verify>`, the stream header) must therefore mean the same domain
under every reading a backend may apply:

* IDNA2003 ToASCII with nameprep (RFC 3490/3491): what Prosody (libidn) and ejabberd
  (its stringprep NIF) apply to JIDs.  Python's `encodings.idna` codec is exactly that.
* UTS #46 non-transitional processing with IDNA2008 validity (the `idna` package): what the
  proxy's DNS and certificate matching use (`policy.pkix_names.normalise_domain`).

The two disagree on the IDNA deviation characters -- `ß` (nameprep: "ss"), `ς` (nameprep:
"σ"), ZERO WIDTH JOINER / NON-JOINER (nameprep: deleted) -- and one accepts names the other
refuses (symbols such as `☃`, labels with `_`, malformed A-labels, leading/trailing hyphens).
`straße.example` is `strasse.example` to Prosody but `xn--strae-oqa.example` to the proxy: a
peer that proved one of them could speak for the other.  So `read_domain` returns one
canonical form (lower-case A-labels, no final dot) only when both readings produce the same
one, and raises `DomainReadingError` with the two readings otherwise.

Cost: every stanza's `from`/`to` goes through here.  Plain LDH ASCII names (nearly all
traffic) take a regex fast path whose answer is exactly what both readings give (the ASCII
letters lower-cased); everything else is computed once and cached.
"""
from __future__ import annotations

import functools
import re
import sys

import idna

# RFC 7622 §3.2: a domainpart is at most 1023 octets; longer input is never run through the
# IDNA code (a peer can send up to limits.max_stanza_bytes in one attribute).
MAX_DOMAIN_CHARS = 1023
# RFC 1035 §2.3.4: 255 octets on the wire, i.e. at most 253 characters in text form.
_MAX_DNS_NAME = 253

# LDH labels (RFC 5890 §2.3.1 "NR-LDH"): letters, digits, inner hyphens, 1-63 characters,
# no "--" in positions 3-4 (that would be an A-label or reserved, which the slow path checks).
# For such names both readings are "lower-case the ASCII letters" -- IDNA2003 ToASCII leaves
# ASCII labels as they are (nameprep's case folding is lower-casing for ASCII) and UTS #46
# maps A-Z to a-z and accepts these labels as valid.
_LDH_LABEL = r"(?!..--)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LDH_NAME = re.compile(rf"(?:{_LDH_LABEL}\.)*{_LDH_LABEL}\.?", re.IGNORECASE | re.ASCII)


class DomainReadingError(ValueError):
    """The text is no domain under one of the readings, or they name different domains."""


def read_domain(name: str) -> str:
    """The one canonical form of `name` (lower-case A-labels, no final dot), or
    `DomainReadingError` saying how the readings differ.

    RFC 7622 §3.2: one final label separator is stripped before a domainpart is compared."""
    if len(name) <= _MAX_DNS_NAME + 1 and _LDH_NAME.fullmatch(name):
        # Interned: every stream of a peer keeps its domains (pairs, verdicts) for life, and
        # one copy per domain beats one per stream (issue 13, memory per idle stream).
        return sys.intern(name.lower().removesuffix("."))
    return _read_slowly(name)


@functools.lru_cache(maxsize=4096)
def _read_slowly(name: str) -> str:
    if len(name) > MAX_DOMAIN_CHARS:
        raise DomainReadingError(f"a domain of {len(name)} characters (RFC 7622 allows at most {MAX_DOMAIN_CHARS})")
    if not name:
        raise DomainReadingError("an empty domain")
    shown = _show(name)
    try:
        # IDNA2003: nameprep (RFC 3491) and ToASCII per label, as Prosody and ejabberd read JIDs.
        nameprep = name.encode("idna").decode("ascii").lower().removesuffix(".")
        nameprep_problem = ""
    except UnicodeError as exc:
        nameprep, nameprep_problem = None, _reason(exc)
    try:
        # UTS #46 non-transitional (ß, ς, ZWJ, ZWNJ kept), IDNA2008 validity.
        uts46 = idna.encode(name, uts46=True, transitional=False).decode("ascii").lower().removesuffix(".")
        uts46_problem = ""
    except (idna.IDNAError, UnicodeError) as exc:
        uts46, uts46_problem = None, _reason(exc)
    if nameprep is None and uts46 is None:
        raise DomainReadingError(f"{shown} is not a domain name (IDNA2003: {nameprep_problem}; "
                                 f"UTS #46: {uts46_problem})")
    if nameprep is None:
        raise DomainReadingError(f"{shown} is refused by IDNA2003 nameprep ({nameprep_problem}), which backends such "
                                 f"as Prosody and ejabberd apply, but read as {uts46} by UTS #46 (DESIGN §2.6)")
    if uts46 is None:
        raise DomainReadingError(f"{shown} is read as {nameprep} by IDNA2003 nameprep (Prosody, ejabberd) but refused "
                                 f"by UTS #46/IDNA2008 ({uts46_problem}): readings differ (DESIGN §2.6)")
    if nameprep != uts46:
        raise DomainReadingError(f"{shown} is read as {nameprep} by IDNA2003 nameprep (Prosody, ejabberd) but as "
                                 f"{uts46} by UTS #46/IDNA2008: two domains in one name (DESIGN §2.6)")
    if not nameprep or len(nameprep) > _MAX_DNS_NAME:
        raise DomainReadingError(f"{shown} is not a domain name (empty or longer than {_MAX_DNS_NAME} characters)")
    return nameprep


def domainpart(jid: str) -> str:
    """The domainpart of a JID (RFC 7622 §3.2), as written: `user@Example.org/res` ->
    `Example.org`.  The resourcepart may contain '@' and '/', the localpart neither, so cut
    at the first '/' and then take what follows the first '@' (if any)."""
    bare = jid.partition("/")[0]
    local, at, domain = bare.partition("@")
    return domain if at else local


def _show(name: str) -> str:
    text = name if len(name) <= 80 else name[:80] + "…"
    return ascii(text) if not text.isascii() else repr(text)


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:120] + "…"


__all__ = ["DomainReadingError", "MAX_DOMAIN_CHARS", "domainpart", "read_domain"]
