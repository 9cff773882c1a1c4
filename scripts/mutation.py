"""Mutation testing of the money core: `make mutation`.

Runs mutmut (configured in pyproject.toml's ``[tool.mutmut]``) over the
modules that move money and keys, with the fast SQLite tests only, and prints
the score of each module and the mutants that survived.

Nothing in the source tree is ever rewritten: the package, its migrations and
the tests are copied to ``build/mutation/`` and mutmut writes its mutated
files under that copy's ``mutants/``. Each run starts from a fresh copy, so a
result never outlives a change to the code or the tests. An interrupted run
(Ctrl-C, or the time bound) stops mutmut's workers and still reports what was
checked; the copy stays in ``build/`` (ignored by git, removed by
``make clean`` and by the next run).

    python scripts/mutation.py                     # every money module
    python scripts/mutation.py core/money.py       # one module (or several)
    python scripts/mutation.py --minutes 20 --jobs 2 --fail-under 90
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

if sys.version_info >= (3, 11):
    from tomllib import loads as toml_loads
else:  # mutmut installs toml on 3.10
    from toml import loads as toml_loads

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
# What the selected tests read: the package, its migrations, the tests, and the
# docs whose snippets some tests run.
COPIED = ["callora_credits", "migrations", "tests", "docs", "pyproject.toml"]
# The test servers' URLs (and CI=true, which would demand them) are dropped:
# the mutation run is SQLite only, so it needs no server and cannot touch one.
DROPPED_ENV = ["CREDITS_TEST_POSTGRES_URL", "CREDITS_TEST_MYSQL_URL", "CI", "PYTHONPATH"]

# mutmut's exit codes per mutant: pytest's own (1 failed, 5 no tests) and
# mutmut's (33 no test reaches the function, 36 and the SIGXCPU codes: timeout).
KILLED, SURVIVED, TIMEOUT, NO_TESTS, NOT_CHECKED, OTHER = (
    "killed",
    "survived",
    "timeout",
    "no tests",
    "not checked",
    "other",
)
STATUS_BY_EXIT_CODE: dict[int | None, str] = {
    1: KILLED,
    3: KILLED,
    0: SURVIVED,
    5: NO_TESTS,
    33: NO_TESTS,
    36: TIMEOUT,
    24: TIMEOUT,
    -24: TIMEOUT,
    152: TIMEOUT,
    255: TIMEOUT,
    None: NOT_CHECKED,
}
STATUSES = (KILLED, SURVIVED, TIMEOUT, NO_TESTS, NOT_CHECKED, OTHER)
# Not a status: how many survivors docs/mutants lists, counted beside them.
LISTED = "listed"


def _config() -> dict[str, list[str]]:
    data = toml_loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    config: dict[str, list[str]] = data["tool"]["mutmut"]
    return config


def _module_files(config: dict[str, list[str]], wanted: list[str]) -> list[str]:
    """The configured money modules that ``wanted`` names (all when empty)."""
    modules = config["only_mutate"]
    if not wanted:
        return modules
    chosen = []
    for name in wanted:
        tail = "/" + name.removesuffix(".py") + ".py"
        matches = [m for m in modules if m == name or m.endswith(tail)]
        if len(matches) != 1:
            raise SystemExit(f"{name!r} is not one of the money modules: {', '.join(modules)}")
        chosen.append(matches[0])
    return chosen


def _mutant_glob(module_file: str) -> str:
    # Mutant names are the module's dotted path, then the mangled function name.
    return module_file.removesuffix(".py").replace("/", ".") + ".*"


def _copy_tree(config: dict[str, list[str]]) -> None:
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "artifacts")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, WORK / name, ignore=ignore)
        else:
            shutil.copy2(source, WORK / name)
    # A test file named in the selection but absent from this tree (one that
    # another branch adds) is left out, rather than failing pytest's collection.
    missing = [
        path
        for path in config["pytest_add_cli_args_test_selection"]
        if path.endswith(".py") and not (ROOT / path).exists()
    ]
    if missing:
        pyproject = WORK / "pyproject.toml"
        lines = pyproject.read_text(encoding="utf-8").splitlines(keepends=True)
        quoted = {f'"{path}"' for path in missing}
        kept = [line for line in lines if line.strip().rstrip(",") not in quoted]
        pyproject.write_text("".join(kept), encoding="utf-8")
        print(f"mutation: not in this tree, left out: {', '.join(missing)}")


def _run_mutmut(globs: list[str], jobs: int, minutes: float) -> int | None:
    """Run mutmut in the copy: its exit status, or ``None`` if it was stopped."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *globs]
    # A session of its own, so the whole group of workers can be stopped.
    process = subprocess.Popen(command, cwd=WORK, env=env, start_new_session=True)  # noqa: S603
    try:
        return process.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        print(f"\nmutation: the {minutes:g}-minute bound is reached; stopping mutmut")
    except KeyboardInterrupt:
        print("\nmutation: interrupted; stopping mutmut")
    # mutmut stops its workers on SIGINT; whatever is left is killed.
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return None


def _results(module_files: list[str]) -> dict[str, dict[str, int | None]]:
    found = {}
    for module_file in module_files:
        meta = WORK / "mutants" / (module_file + ".meta")
        codes: dict[str, int | None] = {}
        if meta.exists():
            try:
                codes = json.loads(meta.read_text())["exit_code_by_key"]
            except json.JSONDecodeError:
                # mutmut writes this file as it goes: a run stopped mid-write
                # leaves it cut short, and its module is left out of the score.
                print(f"mutation: {module_file}.meta was left unfinished; not counted")
        found[module_file] = codes
    return found


# In docs/mutants/*.md a table row names its mutants in its first cell: a
# full name (`pkg.module.x_function__mutmut_7`, or its tail from the module
# on), then more numbers of the same function (`_9`), and `…` for a range.
_NAMED = re.compile(r"`([\w.\u01c1]+__mutmut_)(\d+)`|`_(\d+)`|(…)")


def _listed(docs: Path) -> set[str]:
    """The mutants the pages under ``docs`` list as equivalent (or out of
    reach of the SQLite run), with the reason for each."""
    listed: set[str] = set()
    for page in sorted(docs.glob("*.md")):
        for line in page.read_text(encoding="utf-8").splitlines():
            if not line.startswith("| `"):
                continue
            prefix, last, ranged = "", 0, False
            for full, number, short, dots in _NAMED.findall(line.split(" | ")[0]):
                if dots:
                    ranged = True
                    continue
                if full:
                    prefix = full
                value = int(number or short)
                if not prefix:
                    continue
                start = last + 1 if ranged else value
                listed.update(f"{prefix}{n}" for n in range(start, value + 1))
                last, ranged = value, False
    return listed


def _is_listed(name: str, listed: set[str]) -> bool:
    return any(name == entry or name.endswith("." + entry) for entry in listed)


def _report(results: dict[str, dict[str, int | None]], complete: bool) -> float:
    """Print the score of each module and the survivors, told apart by whether
    docs/mutants lists them; return the total score.

    Two scores: of every mutant checked, and of those left once the listed
    ones (equivalent, or out of the SQLite run's reach) are set aside.
    """
    listed = _listed(ROOT / "docs" / "mutants")
    total: Counter[str] = Counter()
    known: list[str] = []
    unknown: list[str] = []
    print()
    print(
        f"{'module':40} {'mutants':>7} {'killed':>7} {'survived':>8} {'no tests':>8} "
        f"{'listed':>7}  score  unlisted"
    )
    for module_file, codes in results.items():
        status = {name: STATUS_BY_EXIT_CODE.get(code, OTHER) for name, code in codes.items()}
        counts: Counter[str] = Counter(status.values())
        left = sorted(name for name, s in status.items() if s in (SURVIVED, NO_TESTS, OTHER))
        here = [name for name in left if _is_listed(name, listed)]
        counts[LISTED] = len(here)
        total.update(counts)
        known += here
        unknown += [name for name in left if name not in here]
        print(_line(module_file, counts))
    print(_line("total", total))
    if total[NOT_CHECKED]:
        print(f"\n{total[NOT_CHECKED]} mutants were not checked (the run was stopped first).")
    if known or unknown:
        print(f"\n{len(known)} survivors are listed in docs/mutants with the reason for each.")
        show = f"cd {WORK.relative_to(ROOT)} && {sys.executable} -m mutmut show NAME"
        print(f"{len(unknown)} are not (`{show}` shows one as a diff):")
        for name in unknown:
            print("   ", name)
    stale = sorted(
        name
        for codes in results.values()
        for name, code in codes.items()
        if STATUS_BY_EXIT_CODE.get(code) in (KILLED, TIMEOUT) and _is_listed(name, listed)
    )
    if stale:
        print(f"\n{len(stale)} mutants listed in docs/mutants were killed (a stale listing):")
        for name in stale:
            print("   ", name)
    if not complete:
        print("\nThe run did not finish: the score counts only the mutants checked.")
    return _score(total)


def _score(counts: Counter[str], *, unlisted: bool = False) -> float:
    # A timeout is a kill (the mutant never finished); "not checked" is not
    # counted, nor, for the unlisted score, the listed survivors.
    checked = sum(counts[status] for status in STATUSES) - counts[NOT_CHECKED]
    if unlisted:
        checked -= counts[LISTED]
    return 100.0 * (counts[KILLED] + counts[TIMEOUT]) / checked if checked else 0.0


def _line(name: str, counts: Counter[str]) -> str:
    mutants = sum(counts[status] for status in STATUSES)
    killed = counts[KILLED] + counts[TIMEOUT]
    return (
        f"{name:40} {mutants:>7} {killed:>7} {counts[SURVIVED] + counts[OTHER]:>8} "
        f"{counts[NO_TESTS]:>8} {counts[LISTED]:>7} {_score(counts):>5.1f}% "
        f"{_score(counts, unlisted=True):>8.1f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "modules", nargs="*", help="money modules to mutate, e.g. core/money.py (default: all)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument(
        "--minutes", type=float, default=120, help="stop after this many minutes (default 120)"
    )
    parser.add_argument(
        "--fail-under", type=float, default=0, help="exit 1 if the score is below this percentage"
    )
    args = parser.parse_args(argv)
    config = _config()
    module_files = _module_files(config, args.modules)
    _copy_tree(config)
    globs = [] if not args.modules else [_mutant_glob(m) for m in module_files]
    started = time.monotonic()
    status = _run_mutmut(globs, args.jobs, args.minutes)
    if status:
        print(f"mutation: mutmut failed (exit status {status}); see its output above")
        return status
    score = _report(_results(module_files), complete=status == 0)
    print(f"\nmutation: {score:.1f}% killed in {(time.monotonic() - started) / 60:.1f} minutes")
    return 1 if score < args.fail_under else 0


if __name__ == "__main__":
    sys.exit(main())
