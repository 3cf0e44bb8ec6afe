"""Waivers: findings a named owner accepts, for a stated reason, until an expiry date.

A waiver names a rule and narrows it by class and/or images (paths, with * and ?, or sha256
hashes). Without paths or hashes it covers the rule's class findings and image findings;
with them, only those images. An image finding's class is the class the model predicted for
the image: the class whose evidence the finding is about. Waived findings stay in the report,
marked ``waived``, and do not fail the gate; once the waiver has expired (the day after
``expires``) they count again and the run says so in a warning.
"""
from __future__ import annotations

import datetime as dt
from fnmatch import fnmatchcase

from auditor.inputs.config import AuditConfig, ConfigError, Waiver
from auditor.record import RunRecord, Waived
from auditor.registry import RULES, UnknownName


def check(cfg: AuditConfig, classes: list[str], rules: dict) -> list[str]:
    """Config errors for unknown rules and classes; warnings for waivers of rules that do not run."""
    warnings = []
    for k, w in enumerate(cfg.waivers):
        try:
            RULES.get(w.rule)
        except UnknownName as e:
            raise ConfigError(f"{cfg.source}: 'waivers.{k}.rule': {e}") from None
        if w.class_ is not None and w.class_ not in classes:
            raise ConfigError(f"{cfg.source}: 'waivers.{k}.class': unknown class {w.class_!r} "
                              f"(classes: {', '.join(classes)})")
        if w.rule not in rules:
            warnings.append(f"waiver {k} is for rule {w.rule!r}, which this audit does not run")
    return warnings


def _covers(w: Waiver, rule: str, cls: str, path: str | None = None, sha: str | None = None) -> bool:
    if w.rule != rule or (w.class_ is not None and w.class_ != cls):
        return False
    if not (w.paths or w.hashes):
        return True
    return path is not None and (sha in w.hashes or any(fnmatchcase(path, p) for p in w.paths))


def mark(w: Waiver, k: int) -> Waived:
    return Waived(waiver=k, owner=w.owner, reason=w.reason, expires=w.expires.isoformat())


def apply(waivers: list[Waiver], record: RunRecord, today: dt.date) -> tuple[RunRecord, list[str]]:
    """The record with every finding an unexpired waiver covers (the first that does) marked
    ``waived``, and warnings for expired and unused waivers."""
    hits = [0] * len(waivers)
    expired_hits = [0] * len(waivers)

    def first(covers) -> dict | None:
        for k, w in enumerate(waivers):
            if covers(w):
                if w.expires < today:
                    expired_hits[k] += 1
                    continue
                hits[k] += 1
                return mark(w, k)
        return None

    samples = [s.model_copy(update={"findings": tuple(
        f.model_copy(update={"waived": first(lambda w: _covers(w, f.rule, s.prediction, s.path, s.sha256))})
        for f in s.findings)}) if s.findings else s for s in record.samples]
    class_findings = tuple(f.model_copy(update={"waived": first(lambda w: _covers(w, f.rule, f.cls))})
                           for f in record.class_findings)
    warnings = []
    for k, w in enumerate(waivers):
        what = f"waiver {k} ({w.rule}{', class ' + w.class_ if w.class_ else ''}, owner {w.owner})"
        if w.expires < today:
            warnings.append(f"{what} expired on {w.expires.isoformat()}: "
                            f"its {expired_hits[k]} finding(s) count against the gate again")
        elif not hits[k]:
            warnings.append(f"{what} matched no finding; remove it if the problem is gone")
    return record.model_copy(update={"samples": tuple(samples), "class_findings": class_findings}), warnings
