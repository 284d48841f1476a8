"""The whole inbound `Evidence` of a peer domain, remembered until its shortest TTL runs out.

A warm verdict used to re-run `policy.peer_evidence.gather` for every stream: five cached
`Resolver.lookup` calls in two nurseries, names parsed again, the evidence rebuilt — about
a tenth of a stream set-up's CPU (bench/README.md).  The evidence is a pure function of the
answers it rests on, so it can be kept exactly as long as the shortest-lived of them
(`Evidence.ttl`, DESIGN §2.1), and no longer: a cached entry never outlives a cached answer.

What would make the same answers read differently is part of the key or ends the entry:

- the policy's static SRV and TLSA (they replace lookups): part of the key;
- the resolver's DNSSEC probe (DESIGN §2.1 item 5: insecure answers count as unvalidated
  while a resolver fails it): an entry is used only under the probe verdicts it was made
  with (`Resolver.validation_epoch`), and not while a probe is due (the lookups that run
  the probe must happen);
- evidence with any failed status (bogus, timeout, unvalidated) is never kept: a repaired
  zone or a resolver back up counts at once, as it did with the resolver's cache alone.

Evidence from the policy file alone (static SRV and TLSA, no lookup: `ttl` None) is kept until
the policy changes, which changes the key.

Bounded (`max_entries`, least recently used out) so many peer domains cannot grow it.
"""
from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import replace

from policy.evidence import Evidence

# As many domains as the resolver keeps answers for (policy.dns.MAX_CACHE_ENTRIES) would be
# more than needed: one domain's evidence rests on ~5 answers.  2000 peer domains at a few
# KiB each stay a few MiB.
MAX_EVIDENCE_ENTRIES = 2000


class EvidenceCache:
    """`get(key, resolver)` / `put(key, resolver, evidence)`; `clock` is monotonic seconds."""

    def __init__(self, *, max_entries: int = MAX_EVIDENCE_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: collections.OrderedDict[Hashable, tuple[float, object, Evidence]] = (
            collections.OrderedDict())
        self._max = max_entries
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _epoch(resolver) -> object | None:
        """The resolver's probe state the evidence was read under; None: do not cache now."""
        due = getattr(resolver, "probe_due", None)
        if due is not None and due():
            return None
        return getattr(resolver, "validation_epoch", 0)

    def get(self, key: Hashable, resolver) -> Evidence | None:
        """The evidence stored under `key`, with `ttl` the seconds it has left; None when
        there is none, it expired, or the resolver's probe state changed since."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, epoch, evidence = entry
        remaining = expires - self._clock()
        # Under a second left counts as expired: served evidence always has ttl >= 1, so
        # whoever schedules by it (proxy/reverify.py) finds it gone when that time comes.
        if remaining < 1 or epoch != self._epoch(resolver):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return evidence if evidence.ttl is None else replace(evidence, ttl=int(remaining))

    def put(self, key: Hashable, resolver, evidence: Evidence) -> None:
        """Keep `evidence` for `evidence.ttl` seconds if it may be kept at all."""
        ttl = evidence.ttl
        if evidence.notes or (ttl is not None and ttl <= 0):
            return   # a probe problem, or expired already
        # ttl None: nothing came from DNS (the policy file's static SRV and TLSA, which are in
        # the key): it holds until the policy changes, which changes the key.
        lifetime = math.inf if ttl is None else ttl
        if any(status.failed for status in evidence.statuses.values()):
            return
        if evidence.tlsa_status is not None and evidence.tlsa_status.failed:
            return
        epoch = self._epoch(resolver)
        if epoch is None:
            return
        self._entries[key] = (self._clock() + lifetime, epoch, evidence)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


__all__ = ["EvidenceCache", "MAX_EVIDENCE_ENTRIES"]
