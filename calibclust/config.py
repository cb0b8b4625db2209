"""The one base of calibclust's settings dataclasses (CDC, SPICE, K-means, MoCo-v2, augmentations, views).

A subclass is a ``@dataclass`` that lists its fields with their defaults and returns what is wrong
with a value from :meth:`Config.problems`. The base gives every config the same behaviour:

* **validation that collects every problem** (of nested configs too, prefixed ``views.flip_p``)
  into one :class:`ConfigError`, so a user fixes a settings file in one pass;
* **strict** :meth:`Config.from_dict`: unknown keys are problems (a typo is never ignored), nested
  configs are built from their dicts, and JSON's lists come back as the tuples they were;
* :meth:`Config.to_dict`: plain JSON values, nested configs as dicts;
* :meth:`Config.check_resume`: ``--resume`` refuses settings that differ from the checkpoint's,
  except the fields a subclass lists in :attr:`Config.RESUMABLE` (they do not change the math).

Torch-free.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

from calibclust.errors import InputError


class ConfigError(InputError, ValueError):
    """Invalid settings: every problem found, in one message (exit code 2 on the command line).

    Also a ``ValueError``, which is what invalid arguments raise in Python code."""

    def __init__(self, title: str, problems: list[str]):
        self.title, self.problems = title, list(problems)
        super().__init__(f"invalid {title}: " + "; ".join(self.problems))

    def __reduce__(self):  # picklable across processes despite the two-argument constructor
        return (type(self), (self.title, self.problems))


class Config:
    """Base of the settings dataclasses (see the module docstring)."""

    TITLE: ClassVar[str] = "configuration"  # "invalid {TITLE}: ..." in errors
    RESUMABLE: ClassVar[frozenset[str]] = frozenset()  # fields --resume may change
    # Named sets of values for the fields a config leaves None, picked by its ``profile`` field
    # (DCCM's and GCC's "cpu" and "paper"); empty for configs without profiles.
    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {}

    def problems(self) -> list[str]:
        """What is wrong with these values, one sentence each; empty when they are valid."""
        return []

    def _coerce(self) -> None:
        """Bring values to their canonical types before validation (e.g. lists to tuples)."""

    def setting(self, name: str) -> Any:
        """A profile-decided setting: the field when given, else its value in the ``profile`` of :attr:`PROFILES`."""
        value = getattr(self, name)
        return self.PROFILES[self.profile][name] if value is None else value

    def __post_init__(self):
        found = []
        for name, kind in _nested_fields(type(self)).items():
            value = getattr(self, name)
            if isinstance(value, dict):
                try:
                    value = kind.from_dict(value)
                except ConfigError as exc:
                    found += [f"{name}.{p}" for p in exc.problems]
                    continue
                setattr(self, name, value)
            elif not isinstance(value, kind):
                found.append(f"{name} must be a {kind.__name__} or a dict, got {type(value).__name__}")
        # The subclass's own checks run even when a nested config is invalid (every problem in one
        # pass); they must not rely on nested configs being built.
        self._coerce()
        found += self.problems()
        if found:
            raise ConfigError(self.TITLE, found)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict (a settings file, a checkpoint's JSON); unknown keys are refused."""
        if not isinstance(data, dict):
            raise ConfigError(cls.TITLE, [f"expected an object of settings, got {type(data).__name__}"])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        hints = _hints(cls)
        values = {k: _from_json(v, hints.get(k)) for k, v in data.items() if k in fields}
        try:
            config = cls(**values)
        except ConfigError as exc:
            if not unknown:
                raise
            raise ConfigError(cls.TITLE, [_unknown(unknown, fields)] + exc.problems) from None
        if unknown:
            raise ConfigError(cls.TITLE, [_unknown(unknown, fields)])
        return config

    def check_resume(self, saved: dict[str, Any], where: str = "the checkpoint") -> None:
        """Refuse to resume a run saved with ``saved`` (its ``to_dict()``) under these settings,
        naming every field that differs, except :attr:`RESUMABLE` ones. Fields added since the
        checkpoint was written take their defaults (through :meth:`from_dict`)."""
        try:
            then = type(self).from_dict(dict(saved)).to_dict()
        except ConfigError as exc:
            raise InputError(f"{where} was saved with settings this version cannot read ({exc}); start a new run") from None
        now = self.to_dict()
        diff = sorted(k for k in now if k not in self.RESUMABLE and then.get(k) != now[k])
        if diff:
            raise InputError(f"--resume with different settings than {where}: "
                             + ", ".join(f"{k} ({then.get(k)!r} → {now[k]!r})" for k in diff))


def _unknown(keys: list[str], fields: dict) -> str:
    return f"unknown setting(s) {', '.join(keys)} (known: {', '.join(fields)})"


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError) as exc:  # nested configs and tuples could not be rebuilt: say so
        raise TypeError(f"{cls.__name__}: its field annotations must resolve at run time ({exc})") from None


def _nested_fields(cls: type) -> dict[str, type]:
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if isinstance(kind, type) and issubclass(kind, Config):
            out[f.name] = kind
    return out


def _from_json(value: Any, kind: Any) -> Any:
    """JSON has no tuples: a list read back into a tuple-typed field becomes a tuple again."""
    if isinstance(value, list) and kind is not None:
        options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        if any(o is tuple or typing.get_origin(o) is tuple for o in options):
            return tuple(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
