"""Skip-and-count: how a converter accounts for the records it could not convert.

A converter walks the records of an annotation file inside `ProblemLog.record(file, label)`.
Anything wrong with one record (a missing key, a wrong type, an image that is not there) is
raised as a `RecordProblem`; the log turns it into a `Problem` naming the file and the record
(`dataset_coco.json: images[12] (cocoid 391895): missing 'sentences'`), counts it under its
reason and skips the record. With `strict=True` the first problem stops the run instead, as a
`ConversionError` carrying the same message.

An input that cannot be read at all (not valid JSON, not the expected top-level shape) is an
`InputError`, raised whatever `strict` says: there is nothing to skip to.

The unit of counting is the source record a converter walks: an image entry of a Karpathy file,
a question, a ref, a video, a question of a QA file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

MALFORMED = "malformed"  # a missing key, a wrong type, a value out of its set
MISSING_MEDIA = "missing_media"  # the image or video file is not under any media root
BAD_MEDIA = "bad_media"  # the file is there but is not an image / a supported video
UNMATCHED = "unmatched"  # the record points at something the other files lack (annotation, box)
DUPLICATE = "duplicate"  # a second record with a sample key already written to the split


class RecordProblem(Exception):
    """One record cannot be converted; raised inside `ProblemLog.record`."""

    def __init__(self, message: str, reason: str = MALFORMED):
        super().__init__(message)
        self.message = message
        self.reason = reason


class ConversionError(RuntimeError):
    """A strict run met a problem; the message names the file and the record."""


class InputError(ValueError):
    """An input file cannot be used at all: missing, not valid JSON, or of another shape."""


@dataclass(frozen=True)
class Problem:
    file: str
    record: str
    message: str
    reason: str = MALFORMED

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.message}"


@dataclass
class ConvertReport:
    """What one converter run did: samples written per split, records skipped per reason."""

    format: str
    output: str
    converted: dict[str, int] = field(default_factory=dict)  # split -> samples written
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records skipped
    problems: list[Problem] = field(default_factory=list)  # the first ones, in order met

    @property
    def total_converted(self) -> int:
        return sum(self.converted.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "output": self.output,
            "converted": self.converted,
            "total_converted": self.total_converted,
            "skipped": self.skipped,
            "total_skipped": self.total_skipped,
            "problems": [{**asdict(p), "text": str(p)} for p in self.problems],
        }

    def summary(self) -> str:
        splits = ", ".join(f"{split} {count}" for split, count in self.converted.items())
        text = f"{self.format}: converted {self.total_converted} samples ({splits or 'none'}) into {self.output}"
        if self.skipped:
            reasons = ", ".join(f"{reason} {count}" for reason, count in self.skipped.items())
            text += f"; skipped {self.total_skipped} records ({reasons}), see {self.output}/report.json"
        return text


class ProblemLog:
    """Counts skipped records per reason and keeps the first `keep` problems."""

    def __init__(self, strict: bool = False, keep: int = 100):
        self.strict = strict
        self.keep = keep
        self.counts: Counter[str] = Counter()
        self.problems: list[Problem] = []

    def add(self, problem: Problem) -> None:
        if self.strict:
            raise ConversionError(f"{problem} (run without --strict to skip such records)")
        self.counts[problem.reason] += 1
        if len(self.problems) < self.keep:
            self.problems.append(problem)

    @contextmanager
    def record(self, file: str, label: str) -> Iterator[None]:
        """Run the block for one record; a `RecordProblem` inside skips the rest of the block."""
        try:
            yield
        except RecordProblem as error:
            problem = Problem(file, label, error.message, error.reason)
        else:
            return
        self.add(problem)  # outside the except block: a strict run's error does not chain to it


def label(collection: str, index: int, record: Any, id_key: str | None = None) -> str:
    """`images[12] (cocoid 391895)`: where a record sits, with its id when it has one."""
    text = f"{collection}[{index}]"
    if id_key and isinstance(record, dict) and id_key in record:
        text += f" ({id_key} {record[id_key]})"
    return text


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}


def need(record: Any, key: str, kind: type | tuple[type, ...], non_empty: bool = False) -> Any:
    """`record[key]`, checked to be of `kind`; a `RecordProblem` that says what was wrong otherwise."""
    if not isinstance(record, dict):
        raise RecordProblem(f"record is {type(record).__name__} {_short(record)}; expected an object")
    if key not in record:
        raise RecordProblem(f"missing {key!r}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise RecordProblem(f"{key!r} is {_short(value)} ({type(value).__name__}); expected {expected}")
    if non_empty and not value:
        raise RecordProblem(f"{key!r} is empty")
    return value


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
