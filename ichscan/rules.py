"""Series selection rules: which files are axial head CT, worth screening.

A PACS that routes to ichscan sends everything: scouts, chest CTs, bone reconstructions,
dose reports, structured reports. The rules say what is screened; everything else gets a
``skipped`` row whose reason names the rule (``rule body-part: SeriesDescription 'CHEST
5mm' does not match head/brain``). They are data, not code (as MONAI Deploy's series
selector and mercure's routing rules are): a built-in default that matches axial head CT,
changed by a TOML file (``--rules FILE``; ``ichscan rules show`` prints the default).

Every rule has a name and can be switched off; a rule on a tag the file lacks passes, so
files that carry little more than pixels (the RSNA 2019 set) are screened. The per-file
rules run in the decode workers (:func:`ichscan.dicom.decode_instance`), so this module
imports neither torch nor anything of the pipeline; :class:`SelectionRules` is small and
picklable. ``largest-series`` is decided per study, by the pipeline
(:mod:`ichscan.sources.largest_series`), with :func:`choose_series` from here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydicom.datadict import tag_for_keyword

from ichscan.dicom import _floats, text_value as _text

__all__ = [
    "DEFAULT_RULES",
    "RulesError",
    "SelectionRules",
    "choose_series",
    "load_rules",
    "parse_rules",
]


class RulesError(ValueError):
    """A rules file that cannot be used; the message is one line naming the file and the problem."""

    def __init__(self, message: str):
        # Messages quote the file (a regular expression's own error repeats the pattern):
        # control characters are shown escaped, so the message stays one line.
        super().__init__(_CONTROL.sub(lambda m: repr(m.group())[1:-1], message))


#: Control characters but tab: not on one line, and not raw in a TOML string.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def image_type(ds: Any) -> list[str]:
    """ImageType's values, upper case (``[]`` when absent)."""
    try:
        value = ds.get("ImageType")
    except Exception:  # noqa: BLE001 - a malformed element reads as missing
        return []
    if value is None or value == "":
        return []
    values = value.split("\\") if isinstance(value, str) else list(value)
    return [str(v).strip().upper() for v in values]


@dataclass(frozen=True)
class Rule:
    """One named rule. :meth:`failure` says why a data set fails it, or ``None``."""

    name: ClassVar[str] = ""
    #: One line for ``rules show`` and the docs.
    summary: ClassVar[str] = ""
    enabled: bool = True

    def failure(self, ds: Any) -> str | None:
        return None

    def check_values(self) -> None:
        """Raise ValueError for settings that cannot work (ranges, regexes)."""


@dataclass(frozen=True)
class ModalityRule(Rule):
    name: ClassVar[str] = "modality"
    summary: ClassVar[str] = "Modality is one of these (structured reports, dose reports, MR... are not CT)."
    modalities: tuple[str, ...] = ("CT",)

    def failure(self, ds: Any) -> str | None:
        modality = _text(ds, "Modality")
        if modality and modality.upper() not in {m.upper() for m in self.modalities}:
            return f"Modality {modality} is not {self.modalities[0] if len(self.modalities) == 1 else 'one of ' + ', '.join(self.modalities)}"
        return None

    def check_values(self) -> None:
        if not self.modalities:
            raise ValueError("modalities must name at least one modality")


@dataclass(frozen=True)
class ImageTypeRule(Rule):
    name: ClassVar[str] = "image-type"
    summary: ClassVar[str] = "No ImageType value from the third on is one of these (scouts, localizers, topograms)."
    exclude: tuple[str, ...] = ("LOCALIZER", "SCOUT", "TOPOGRAM")

    def failure(self, ds: Any) -> str | None:
        values = image_type(ds)
        excluded = {e.upper() for e in self.exclude}
        for index, value in enumerate(values[2:], start=3):
            if value in excluded:
                return f"ImageType value {index} {value} ({'/'.join(values)})"
        return None


@dataclass(frozen=True)
class DerivedRule(Rule):
    name: ClassVar[str] = "derived"
    summary: ClassVar[str] = "ImageType is not DERIVED\\SECONDARY (reformats, screen captures, dose screens); to allow them: enabled = false."

    def failure(self, ds: Any) -> str | None:
        values = image_type(ds)
        if values[:2] == ["DERIVED", "SECONDARY"]:
            return f"ImageType {'/'.join(values)} is a derived, secondary image"
        return None


HEAD_PATTERN = r"head|brain|cran|skull|neuro|cereb|ncct|stroke|kopf|sch(ae|ä|a)del|hirn|cerveau|cr[aâ]ne|cabeza|cr[aá]neo"
OTHER_PATTERN = (
    r"(?<![a-z])(chest|thora|lung|pulmo|abd|pelv|spine|spinal|[clt]-?spine|lumb|sacr|neck|cardiac|heart|coronar|aort"
    r"|liver|kidney|renal|extrem|knee|hip|shoulder|ankle|wrist|elbow|femur|tibia|sinus|facial|maxillo|orbit|dental"
    r"|mandib|whole ?body|body|trunk|torso)"
)


@dataclass(frozen=True)
class BodyPartRule(Rule):
    name: ClassVar[str] = "body-part"
    summary: ClassVar[str] = (
        "The first of these fields (in this order) that names a body part names the head (a field naming "
        "both counts as head); files whose fields name none pass, unless require_head."
    )
    fields: tuple[str, ...] = ("SeriesDescription", "ProtocolName", "BodyPartExamined", "StudyDescription")
    head: str = HEAD_PATTERN
    other: str = OTHER_PATTERN
    require_head: bool = False

    def failure(self, ds: Any) -> str | None:
        head, other = _compiled(self.head), _compiled(self.other)
        seen = []
        for keyword in self.fields:
            value = _text(ds, keyword)
            if not value:
                continue
            seen.append(f"{keyword} {value!r}")
            if head.search(value):
                return None
            found = other.search(value)
            if found:
                return f"{keyword} {value!r} does not match head/brain (it names {found.group(0).upper()})"
        if self.require_head and seen:
            return f"no field matches head/brain ({', '.join(seen)})"
        return None

    def check_values(self) -> None:
        for keyword in self.fields:
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"fields: {keyword!r} is not a DICOM keyword")
        for key in ("head", "other"):
            try:
                _compiled(getattr(self, key))
            except re.error as exc:
                raise ValueError(f"{key} is not a valid regular expression: {exc}") from None


@dataclass(frozen=True)
class SliceThicknessRule(Rule):
    name: ClassVar[str] = "slice-thickness"
    summary: ClassVar[str] = "SliceThickness within min_mm..max_mm (slabs thicker than a head series' slices, and zero, are not)."
    min_mm: float = 0.1
    max_mm: float = 20.0

    def failure(self, ds: Any) -> str | None:
        value = _floats(ds, "SliceThickness", 1)
        if value is not None and not self.min_mm <= value[0] <= self.max_mm:
            return f"SliceThickness {value[0]:g} mm is outside {self.min_mm:g}-{self.max_mm:g} mm"
        return None

    def check_values(self) -> None:
        if not 0 <= self.min_mm <= self.max_mm:
            raise ValueError(f"needs 0 <= min_mm <= max_mm (min_mm {self.min_mm:g}, max_mm {self.max_mm:g})")


@dataclass(frozen=True)
class OrientationRule(Rule):
    name: ClassVar[str] = "orientation"
    summary: ClassVar[str] = "Axial: the slice normal (from ImageOrientationPatient) within max_degrees of the z axis."
    max_degrees: float = 35.0

    def failure(self, ds: Any) -> str | None:
        iop = _floats(ds, "ImageOrientationPatient", 6)
        if iop is None:
            return None
        normal = (
            iop[1] * iop[5] - iop[2] * iop[4],
            iop[2] * iop[3] - iop[0] * iop[5],
            iop[0] * iop[4] - iop[1] * iop[3],
        )
        length = math.sqrt(sum(v * v for v in normal))
        if length < 1e-6:
            return None  # degenerate: as if missing
        angle = math.degrees(math.acos(min(1.0, abs(normal[2]) / length)))
        if angle <= self.max_degrees:
            return None
        plane = ("sagittal", "coronal", "oblique")[max(range(3), key=lambda i: abs(normal[i]))] if angle > 60 else "oblique"
        return f"ImageOrientationPatient is {plane}: the slice normal is {angle:.0f} degrees from the z axis (over {self.max_degrees:g})"

    def check_values(self) -> None:
        if not 0 <= self.max_degrees <= 90:
            raise ValueError(f"max_degrees must be within 0-90, not {self.max_degrees:g}")


@dataclass(frozen=True)
class LargestSeriesRule(Rule):
    name: ClassVar[str] = "largest-series"
    summary: ClassVar[str] = (
        "Per study, only the series with the most slices that pass the other rules (ties: the lower "
        "SeriesInstanceUID); decided when the study goes quiet (live) or at the end of the input."
    )
    enabled: bool = False


RULE_TYPES: tuple[type[Rule], ...] = (
    ModalityRule,
    ImageTypeRule,
    DerivedRule,
    BodyPartRule,
    SliceThicknessRule,
    OrientationRule,
    LargestSeriesRule,
)
RULE_NAMES = tuple(t.name for t in RULE_TYPES)


def _default_rules() -> tuple[Rule, ...]:
    return tuple(t() for t in RULE_TYPES)


@dataclass(frozen=True)
class SelectionRules:
    """The rules of a run: one of each kind, in the order they are checked.

    Small and picklable (strings and numbers only): it travels to the decode workers.
    """

    rules: tuple[Rule, ...] = field(default_factory=_default_rules)
    #: Where the rules came from (a file's path, or ``built-in default``).
    origin: str = "built-in default"

    def rule(self, name: str) -> Rule:
        return next(r for r in self.rules if r.name == name)

    @property
    def per_file(self) -> tuple[Rule, ...]:
        """The enabled rules decided by one file's header."""
        return tuple(r for r in self.rules if r.enabled and not isinstance(r, LargestSeriesRule))

    @property
    def largest_series_only(self) -> bool:
        return self.rule(LargestSeriesRule.name).enabled

    def failure(self, ds: Any) -> str | None:
        """``rule NAME: why`` for the first enabled rule ``ds`` fails, ``None`` when it passes all."""
        for rule in self.per_file:
            why = rule.failure(ds)
            if why:
                return f"rule {rule.name}: {why}"
        return None

    def describe(self) -> str:
        """One line: which rules are on and off."""
        on = [r.name for r in self.rules if r.enabled]
        off = [r.name for r in self.rules if not r.enabled]
        return f"{len(on)} rules on ({', '.join(on) or 'none'}); off: {', '.join(off) or 'none'}"


DEFAULT_RULES = SelectionRules()


# -- files ------------------------------------------------------------------------------------


def _setting(rule: Rule, key: str, value: Any) -> Any:
    """``value`` converted to the type of ``rule``'s default for ``key``; ValueError if it is not one."""
    default = getattr(rule, key)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a number, not {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"{key} must be a list of strings, not {value!r}")
        return tuple(v.strip() for v in value)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {value!r}")
    return value


def parse_rules(text: str, origin: str = "rules file") -> SelectionRules:
    """Rules from TOML text: each table (``[body-part]``) changes the built-in rule of that name;
    rules and settings not mentioned keep their defaults.

    Raises
    ------
    RulesError
        For invalid TOML, an unknown rule or setting (a typo must not pass silently), a value
        of the wrong type or out of range; one line naming ``origin``.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{origin}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and tables, unbounded
        raise RulesError(f"{origin}: not valid TOML: arrays or tables nested too deeply") from None
    rules = {r.name: r for r in _default_rules()}
    for name, table in data.items():
        if name not in rules:
            raise RulesError(f"{origin}: unknown rule [{name}]; the rules are {', '.join(RULE_NAMES)}")
        if not isinstance(table, dict):
            raise RulesError(f"{origin}: {name} must be a table ([{name}] with its settings below it)")
        rule = rules[name]
        known = [f.name for f in dataclasses.fields(rule)]
        try:
            changes = {}
            for key, value in table.items():
                if key not in known:
                    raise ValueError(f"unknown setting {key!r}; its settings are {', '.join(known)}")
                changes[key] = _setting(rule, key, value)
            rule = dataclasses.replace(rule, **changes)
            rule.check_values()
        except ValueError as exc:
            raise RulesError(f"{origin}: [{name}] {exc}") from None
        rules[name] = rule
    return SelectionRules(tuple(rules.values()), origin)


def load_rules(path: str | os.PathLike[str]) -> SelectionRules:
    """Rules from a TOML file (see :func:`parse_rules`); RulesError (one line) when it cannot be used."""
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
    except OSError as exc:
        raise RulesError(f"cannot read rules file {os.fspath(path)}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RulesError(f"{os.fspath(path)}: not UTF-8 text") from None
    return parse_rules(text, os.fspath(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back to the same float (0.1234567, 1e+300, 5.0)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if "'" not in value and not _CONTROL.search(value):
        return f"'{value}'"  # a literal string: regular expressions need no doubled backslashes
    # A basic string: TOML allows no control character but tab unescaped (DEL included).
    return '"' + _TOML_ESCAPED.sub(lambda m: f"\\u{ord(m.group()):04x}", value) + '"'


_TOML_ESCAPED = re.compile(r'["\\\x00-\x08\x0a-\x1f\x7f]')


def to_toml(rules: SelectionRules = DEFAULT_RULES) -> str:
    """The rules as a TOML file that :func:`parse_rules` reads back to the same rules."""
    lines = [
        "# ichscan selection rules (ichscan rules show). Use with --rules FILE; check with 'ichscan rules check FILE'.",
        "# A rule on a tag a file lacks passes. Patterns are case-insensitive Python regular expressions.",
        "# Leave out what you do not change: rules and settings not in the file keep their defaults.",
    ]
    for rule in rules.rules:
        lines += ["", f"# {rule.summary}", f"[{rule.name}]"]
        lines += [f"{f.name} = {_toml_value(getattr(rule, f.name))}" for f in dataclasses.fields(rule)]
    return "\n".join(lines) + "\n"


# -- largest series ---------------------------------------------------------------------------


def _uid_key(uid: str) -> tuple:
    """Dotted UIDs compared component by component as numbers (``1.2.9`` before ``1.2.10``)."""
    try:
        return (0, tuple(int(part) for part in uid.split(".")))
    except ValueError:
        return (1, uid)


def choose_series(counts: Mapping[str, int]) -> str:
    """The series with the most slices; of those, the lowest SeriesInstanceUID."""
    return min(counts, key=lambda uid: (-counts[uid], _uid_key(uid)))


def largest_series_reason(series: str, counts: Mapping[str, int]) -> str | None:
    """The skip reason for a file of ``series`` in a study whose series have ``counts`` slices
    (passing the per-file rules); ``None`` for the chosen series."""
    winner = choose_series(counts)
    if series == winner:
        return None
    return (
        f"rule {LargestSeriesRule.name}: series {series} has {counts.get(series, 0)} slices; "
        f"series {winner} of the study has {counts[winner]}"
    )


# -- explain ----------------------------------------------------------------------------------


def explain(paths: Iterable[str | os.PathLike[str]], rules: SelectionRules = DEFAULT_RULES) -> list[tuple[str, str]]:
    """``(file, verdict)`` for every file (folders walked as ``batch`` walks them): the row a
    screening run would give it, ``screened: passes all N rules``, ``skipped: rule NAME: why``
    for the first rule it fails, or the decoder's ``skipped``/``error`` reason. With
    ``largest-series`` on, the series are counted over the files given.
    """
    from ichscan.dicom import OK, decode_instance
    from ichscan.sources.folder import iter_folder

    verdicts: dict[str, str] = {}
    chosen: dict[str, tuple[str, str]] = {}  # path -> (study, series) of the files that pass
    for path in paths:
        entries = iter_folder(path) if os.path.isdir(path) else [None]
        for entry in entries:
            if entry is not None and entry.refusal:
                verdicts[entry.path] = f"error: {entry.refusal}"
                continue
            file = entry.path if entry is not None else os.fspath(path)
            result = decode_instance(file, rules=rules)
            if result.status == OK:
                verdicts[file] = f"screened: passes all {len(rules.per_file)} rules"
                chosen[file] = (result.instance.study_instance_uid, result.instance.series_instance_uid)
            else:
                verdicts[file] = f"{result.status}: {result.error}"
    if rules.largest_series_only:
        counts: dict[str, dict[str, int]] = {}
        for study, series in chosen.values():
            if study and series:
                counts.setdefault(study, {}).setdefault(series, 0)
                counts[study][series] += 1
        for file, (study, series) in chosen.items():
            why = largest_series_reason(series, counts[study]) if study and series else None
            if why:
                verdicts[file] = f"skipped: {why}"
    return list(verdicts.items())
