"""The Great Expectations harness that dataset and window validation share.

A validator describes its checks as :class:`Check` values (the GX expectation,
the table it runs on, and how to put the result in plain words) and hands them
with its tables to :func:`run_checks`, which runs each table's checks as one
GX suite in an ephemeral context and returns one :class:`CheckResult` per
check. GX is imported only here and only while checks run, with its set-up
chatter silenced.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

_EXAMPLES = 10  # offending rows named in a check's detail; the rest are counted


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one expectation; ``detail`` gives observed values or failing examples."""

    name: str
    success: bool
    detail: str


@dataclass(frozen=True)
class Check:
    name: str
    table: str
    expectation: Callable[[], object]  # builds the GX expectation once GX is imported
    describe: Callable[[dict, bool], str]  # (GX result dict, success) -> detail in plain words


def examples(items: list[str]) -> str:
    shown = "; ".join(items[:_EXAMPLES])
    return shown + (f"; and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else "")


@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """Import Great Expectations and keep only its errors: it logs and warns at length about its own set-up."""
    package = logging.getLogger("great_expectations")
    levels = {package: package.level}
    package.setLevel(logging.ERROR)  # before the import, which logs too
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"great_expectations(\.|$)")
            import great_expectations  # noqa: F401 - imported here so that import-time output is filtered too

            # Some GX modules set their own level, so quieting the package logger alone is not enough.
            for name, logger in list(logging.root.manager.loggerDict.items()):
                if name.startswith("great_expectations.") and isinstance(logger, logging.Logger):
                    levels.setdefault(logger, logger.level)
                    logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)


def _raised(exception_info: dict) -> str | None:
    """The exception message of a GX result, if evaluating it raised; GX nests the info per metric at times."""
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    for info in infos:
        if isinstance(info, dict) and info.get("raised_exception"):
            return str(info.get("exception_message"))
    return None


def run_checks(tables: dict[str, pd.DataFrame], make_checks: Callable[[], list[Check]],
               index_columns: dict[str, list[str]]) -> list[CheckResult]:
    """Run each table's checks as one GX suite; ``make_checks`` is called once GX is imported (quietly).

    ``index_columns`` names, per table, the columns that identify an offending row in GX's unexpected_index_list.
    """
    started = time.perf_counter()
    with _quiet_gx():
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        checks = make_checks()
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        data_source = context.data_sources.add_pandas("defectkit")
        results: dict[str, object] = {}
        for table, frame in tables.items():
            expectations = []
            for check in checks:
                if check.table == table:
                    expectation = check.expectation()
                    expectation.meta = {"check": check.name}
                    expectations.append(expectation)
            batch = data_source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
            suite = context.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
            definition = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch,
                                                                                    suite=suite))
            run = definition.run(
                batch_parameters={"dataframe": frame},
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index_columns[table]},
            )
            results.update({r.expectation_config.meta["check"]: r for r in run.results})
    outcomes = []
    for check in checks:
        result = results[check.name]
        error = _raised(result.exception_info or {})
        if error is not None:
            outcomes.append(CheckResult(check.name, False, f"could not be evaluated: {error}"))
        else:
            outcomes.append(CheckResult(check.name, bool(result.success), check.describe(result.result,
                                                                                         bool(result.success))))
    log.info("ran %d expectations in %.2f s: %d failed", len(outcomes), time.perf_counter() - started,
             sum(not o.success for o in outcomes))
    return outcomes
