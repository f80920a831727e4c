"""Command-line plumbing shared by the entry points: config overrides and user errors.

Overrides use ``ml_collections.config_flags`` (``--config.optim.lr=0.05``): the
field's type in the config decides how a value is parsed, and a value of the
wrong type or an unknown field is an error. On top of it:

- a tuple field also accepts ``a,b`` (``--config.eval.ood_sets=gaussian,uniform``)
  besides a Python literal (``"('gaussian', 'uniform')"``);
- ``model.options`` and ``eval.tune_grids.<score>`` accept new keys (model options
  differ per model, a grid names any hyperparameter), parsed as Python literals
  (``--config.model.options.spectral_norm=true``);
- fields whose schema depends on other fields (the objective's hyperparameters
  depend on ``objective.name``, user registrations on ``imports``) are handled
  by :func:`apply_overrides`'s ``prepare`` hook between two passes.

A user error (:class:`UsageError`, or the ``ValueError`` / ``CheckpointError``
/ ``DatasetUnavailableError`` the library raises on bad input) ends the
command with one line on stderr and exit status 2 (:func:`run_main`); set
``OOD_JAX_DEBUG=1`` to see the traceback. Ctrl-C or SIGTERM during training saves
a checkpoint at the next step boundary and ends with one line saying how to
resume, exit status 130 / 143; Ctrl-C elsewhere (the OOD report, the evaluation
command) is one line and exit status 130. Anything else keeps its traceback.
"""

from __future__ import annotations

import ast
import copy
import errno
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

_PREFIX = "--config."
_OPEN_KEYS = ("model.options.", "eval.tune_grids.")


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


def _literal(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def split_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``[(key, raw value)]`` of ``--config.key=value`` arguments; anything else is an error."""
    out = []
    for item in argv:
        if not item.startswith(_PREFIX) or "=" not in item:
            raise UsageError(
                f"unrecognized argument {item!r}; config overrides look like "
                "--config.optim.lr=0.05 (see --help for the other flags)."
            )
        key, raw = item[len(_PREFIX) :].split("=", 1)
        out.append((key, raw))
    return out


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[Any, bool]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def _normalize_value(config: ml_collections.ConfigDict, key: str, raw: str) -> str:
    current, found = _lookup(config, key)
    if found and isinstance(current, tuple | list) and not raw.strip().startswith(("(", "[")):
        items = [] if not raw.strip() else [_literal(t.strip()) for t in raw.split(",")]
        return repr(tuple(items))
    return raw


def _add_open_keys(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
    for key, raw in overrides:
        if not key.startswith(_OPEN_KEYS):
            continue
        _, found = _lookup(config, key)
        parent, found_parent = _lookup(config, key.rsplit(".", 1)[0])
        if not found and found_parent and isinstance(parent, ml_collections.ConfigDict):
            with parent.unlocked():
                parent[key.rsplit(".", 1)[1]] = _literal(raw)


def _take_sweeps(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> list:
    """Sets ``eval.score_hparams.<score>.<swept>=a,b`` (a score's registered sweep given
    several values) directly: the field holds one float until then, which the flag
    parser would refuse a sequence for. Returns the other overrides."""
    from ood_jax.scores import available_scores, get_score

    rest = []
    for key, raw in overrides:
        parts = key.split(".")
        value = _literal(raw if raw.strip().startswith(("(", "[")) else f"({raw},)")
        swept = (
            len(parts) == 4
            and parts[:2] == ["eval", "score_hparams"]
            and parts[2] in available_scores()
            and get_score(parts[2]).sweep == parts[3]
            and isinstance(value, tuple | list)
            and len(value) > 1
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        )
        parent, found = _lookup(config, key.rsplit(".", 1)[0])
        if swept and found:
            with parent.unlocked():  # a new field: the float one's type is fixed
                del parent[parts[3]]
                parent[parts[3]] = tuple(float(v) for v in value)
        else:
            rest.append((key, raw))
    return rest


def _parse(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]):
    argv = ["ood_jax"] + [f"{_PREFIX}{k}={_normalize_value(config, k, v)}" for k, v in overrides]
    values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv)
        values(argv)
    except (AttributeError, KeyError) as err:
        text = str(err).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        raise UsageError(f"unknown config field in {argv[1:]}: {text.splitlines()[0]}") from None
    except flags.Error as err:
        raise UsageError(f"bad config override: {str(err).splitlines()[0]}") from None
    return values.config


def apply_overrides(
    config: ml_collections.ConfigDict,
    overrides: Sequence[str],
    *,
    first: Sequence[str] = (),
    prepare: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``--config.a.b=value`` overrides applied.

    Args:
      config: the preset.
      overrides: command-line arguments, each ``--config.<field>=<value>``.
      first: fields applied in a first pass (those that change the schema, e.g.
        ``objective.name``); then ``prepare(config)`` adds the fields they imply
        (e.g. the objective's hyperparameters), then every override is applied.

    Raises:
      UsageError: an argument that is not an override, an unknown field, or a value
        that does not parse as the field's type.
    """
    pairs = split_overrides(overrides)
    config = copy.deepcopy(config)
    early = [(k, v) for k, v in pairs if k in first]
    if early:
        config = _parse(config, early)
    if prepare is not None:
        prepare(config)
    _add_open_keys(config, pairs)
    pairs = _take_sweeps(config, pairs)
    return _parse(config, pairs) if pairs else config


def config_from_json(values: Any) -> ml_collections.ConfigDict:
    """A ConfigDict from its JSON form (``config.json``, checkpoint metadata).

    JSON has no tuples: lists become tuples again so that overrides keep working.
    """

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(fix(v) for v in x)
        return x

    return ml_collections.ConfigDict(fix(dict(values)))


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None) -> Any:
    """Runs ``main(argv)``; user errors become one stderr line and exit status 2."""
    from ood_jax.checkpoint import CheckpointError, DiskFullError
    from ood_jax.data import DatasetUnavailableError
    from ood_jax.train.loop import TrainingInterrupted

    warnings.formatwarning = _one_line_warning
    try:
        return main(argv)
    except TrainingInterrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:
        if os.environ.get("OOD_JAX_DEBUG"):
            raise
        # Outside the training loop (the OOD report, experiments.evaluate): a report is
        # written to a temporary folder and renamed at the end, so nothing partial is left.
        print(
            "interrupted (Ctrl-C): no report was written and the checkpoints are kept; "
            "run the same command again to redo it.",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except (ValueError, CheckpointError, DatasetUnavailableError) as err:
        if os.environ.get("OOD_JAX_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno != errno.ENOSPC or os.environ.get("OOD_JAX_DEBUG"):
            raise
        if isinstance(err, DiskFullError):
            message = str(err)
        else:
            where = f" writing {err.filename}" if err.filename else ""
            message = (
                f"no space left on device{where}. Free some space and run the same command "
                "again: it resumes from the newest checkpoint."
            )
        print(f"error: {message}", file=sys.stderr)
        sys.stderr.flush()
        _silence_stderr()  # orbax's threads report the same failure again at shutdown
        raise SystemExit(2) from None


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings of a command (a skipped corrupt checkpoint, a repaired log) as one line."""
    if issubclass(category, UserWarning) and not os.environ.get("OOD_JAX_DEBUG"):
        return f"warning: {' '.join(str(message).split())}\n"
    return _FORMAT_WARNING(message, category, filename, lineno, line)


_FORMAT_WARNING = warnings.formatwarning


def _silence_stderr() -> None:
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
