"""``rank_pattern`` / ``alpha_pattern`` keys of an uploaded PEFT config: regexes, matched with bounded work.

PEFT (``get_pattern_key``) gives a module the value of the first key for which
``re.match(rf"(.*\\.)?({key})$", name)`` matches. Python's ``re`` backtracks: a key such as ``(a+)+$``
takes time exponential in the length of a name with a long run of ``a``, and even a plain sequence of
k ``.*`` costs about L^(k+1) steps on a name of L characters. A key from an upload is therefore used
only if it

* parses as a regex on its own (so it cannot close the group around it and escape the ``$`` anchor),
* repeats nothing that itself holds a choice (a quantifier or an alternation): nested quantifiers are
  what backtracks exponentially,
* uses no backreferences, and holds at most ``MAX_CHOICES`` choices (quantifiers and alternations),

and a config is used only if its module names are at most ``MAX_NAME_CHARS`` long and all its keys
against all its names cost at most ``WORK_BUDGET`` steps, a step count being C(L + c + 1, c + 1) for a
key with c choices (plus the prefix's ``.*``) against a name of L characters: the ways to split the name
among the choices, each of which the matcher may try once. Ordinary keys (plain names, ``layers\\.\\d+``,
``.*q_proj``) cost a few thousand steps per name. What is refused names the key and the limit.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from adapters_store.format import AdapterFormatError

try:  # Python >= 3.11
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

FIELDS = ("rank_pattern", "alpha_pattern")
MAX_KEYS = 1024  # per field
MAX_KEY_CHARS = 256
MAX_CHOICES = 3  # quantifiers + alternations per key
MAX_NAME_CHARS = 200  # module names matched against keys (real ones are under 100)
WORK_BUDGET = 100_000_000  # steps for all keys against all names (~0.3 s at worst)
_REPEATS = {sre.MAX_REPEAT, sre.MIN_REPEAT} | ({sre.POSSESSIVE_REPEAT} if hasattr(sre, "POSSESSIVE_REPEAT") else set())
_BACKREFS = {sre.GROUPREF, sre.GROUPREF_EXISTS} | ({sre.GROUPREF_IGNORE} if hasattr(sre, "GROUPREF_IGNORE") else set())
_ATOMIC = getattr(sre, "ATOMIC_GROUP", None)  # Python >= 3.11


class _Refused(Exception):
    pass


def _choices(items) -> int:
    """Quantifiers (whose count is not fixed) and alternations in a parsed regex; raises _Refused for a
    backreference or a repeat around anything that holds a choice."""
    n = 0
    for op, av in items:
        if op in _REPEATS:
            lo, hi, body = av
            inner = _choices(body)
            if inner and hi > 1:
                raise _Refused("repeats a group that holds a quantifier or alternation (nested quantifiers "
                               "backtrack catastrophically)")
            n += inner + (lo != hi)
        elif op is sre.BRANCH:
            n += 1 + sum(_choices(alt) for alt in av[1])
        elif op is sre.SUBPATTERN:
            n += _choices(av[-1])
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            n += _choices(av[1])
        elif op in _BACKREFS:
            raise _Refused("uses a backreference")
        elif op is _ATOMIC:
            n += _choices(av)
    return n


@lru_cache(maxsize=4096)
def _analyse(key: str) -> tuple[re.Pattern | None, int, str | None]:
    """(compiled PEFT matcher, choices, None) or (None, 0, why the key is refused)."""
    if len(key) > MAX_KEY_CHARS:
        return None, 0, f"is {len(key)} characters, over the limit of {MAX_KEY_CHARS}"
    try:
        choices = _choices(sre_parse.parse(key))
        matcher = re.compile(rf"(.*\.)?({key})$")
    except _Refused as e:
        return None, 0, str(e)
    except (re.error, RecursionError, OverflowError) as e:
        return None, 0, f"is not a valid regex (on its own, inside PEFT's (.*\\.)?(KEY)$): {e}"
    if choices > MAX_CHOICES:
        return None, 0, f"holds {choices} quantifiers/alternations, over the limit of {MAX_CHOICES}"
    return matcher, choices, None


def _shown(key: str) -> str:
    return repr(key if len(key) <= 64 else key[:64] + "...")


def key_problems(field: str, patterns: dict) -> list[str]:
    """Why the keys of ``rank_pattern`` or ``alpha_pattern`` cannot be used (empty when they can)."""
    if len(patterns) > MAX_KEYS:
        return [f"adapter_config.json field {field!r} has {len(patterns)} keys, over the limit of {MAX_KEYS}"]
    problems = []
    for key in patterns:
        why = "is not a string" if not isinstance(key, str) else _analyse(key)[2]
        if why:
            problems.append(f"adapter_config.json field {field!r} key {_shown(str(key))} {why}")
    return problems


def work_problems(cfg: dict, names: list[str]) -> list[str]:
    """Why matching the config's (already checked) keys against these module names is refused."""
    keys = [k for f in FIELDS if isinstance(cfg.get(f), dict) for k in cfg[f]]
    if not keys:
        return []
    long = [n for n in names if len(n) > MAX_NAME_CHARS]
    if long:
        return [f"module name {_shown(long[0])} is {len(long[0])} characters, over the {MAX_NAME_CHARS} that "
                "rank_pattern/alpha_pattern keys are matched against"]
    work = sum(math.comb(len(n) + _analyse(k)[1] + 1, _analyse(k)[1] + 1) for k in keys for n in names)
    if work > WORK_BUDGET:
        return [f"adapter_config.json fields rank_pattern/alpha_pattern: {len(keys)} keys against {len(names)} "
                f"module names need up to {work:.2e} regex steps, over the limit of {WORK_BUDGET:.0e}; use fewer "
                "keys, or plain module names instead of quantifiers"]
    return []


def pattern_value(patterns: dict, module_name: str, default):
    """PEFT's get_pattern_key: the value of the first key matching ``(.*\\.)?{key}$`` against the module name.
    A refused key or an over-long name raises AdapterFormatError (the config checks report them first)."""
    if patterns and len(module_name) > MAX_NAME_CHARS:
        raise AdapterFormatError(f"module name {_shown(module_name)} is over {MAX_NAME_CHARS} characters")
    for key, value in patterns.items():
        matcher, _, why = _analyse(key)
        if matcher is None:
            raise AdapterFormatError(f"pattern key {_shown(key)} {why}")
        if matcher.match(module_name):
            return value
    return default
