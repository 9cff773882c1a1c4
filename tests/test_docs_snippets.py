"""Every snippet of README.md and docs/*.md runs as shown.

**Python blocks** (```` ```python ````) run in a fresh namespace, in a
temporary working directory. A block that needs an app names its setup in an
HTML comment on the line before its fence (invisible on the rendered page):

- ``<!-- snippet: host-app -->``: ``app`` and ``db`` are a fresh host app
  (Flask, Flask-SQLAlchemy on a new migrated SQLite file, a ``JWTManager``,
  ``credits_bp`` at ``/api/billing``) and its ``SQLAlchemy``; the block runs
  inside ``app.app_context()``.
- ``<!-- snippet: app-without-credits -->``: the same, before ``credits_bp`` is
  registered (for blocks that show the registration).
- ``<!-- snippet: continues -->``: the namespace, app and app context of the
  page's previous Python block, as a reader running the page top to bottom.

**HTTP examples**: every ``curl`` command of a shell block is sent, in page
order, to one fresh host app per page (SQLite); a ``flask … credits …``
command among them runs on that app through Flask's CLI runner (it must exit
0). ``$BASE`` is
``http://127.0.0.1:5000/api/billing``; ``$TOKEN`` and ``$USER_TOKEN`` are
tokens of ``user_123`` with no scope, ``$SERVICE_TOKEN`` of ``api_gateway``
with ``credits:charge``, ``$ADMIN_TOKEN`` of ``ops_admin`` with
``credits:admin``. A ``NAME=$(date …)`` line sets ``$NAME`` for the commands
after it: its ``date`` command is run, as the reader's shell would. The
response shown for a command is what follows it before the next command:

- a status line, a paragraph starting with a code span such as
  ```` `201 Created` ````, optionally followed by header code spans
  (```` `Allow: POST` ````), or a block starting with ``HTTP/1.1 201 CREATED``
  and header lines; then, optionally, the JSON block right after it;
- or, with no status, a JSON block right after the command (a 2xx).

A command shown with no response must answer a 2xx. ``<!-- snippet: again -->``
before a status line or block means the previous command sent once more; a
further status before the next command must say it is not replayed with
``<!-- snippet: illustration -->``.
The status must match, every header shown must be there (a request id in the
right form), and the JSON body must match in shape and value, except that ids
(``ctx_…``, ``hold_…``, ``grant_…``, ``req_…``), ``next_cursor`` and ``ETag`` values stand
for the real ones (the first response that shows one maps it, and later
commands and bodies use the mapping) and timestamps are checked for their
form only.

**Illustrations**: a status line or error body that follows no command must
still be true: the reason phrase is the one the server sends, and a JSON
error body has the library's shape, a code the library has, and that code's
status when a status line is shown.

Other blocks (shell commands other than ``curl`` and ``flask … credits``,
console transcripts, text) are not run.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from conftest import ADMIN_SCOPE, SECRET, SERVICE_SCOPE, make_token
from flask import Flask
from flask_jwt_extended import JWTManager
from flask_sqlalchemy import SQLAlchemy
from werkzeug.http import HTTP_STATUS_CODES

from callora_credits import credits_bp, migrate
from callora_credits.http.blueprint import error_statuses

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BASE = "http://127.0.0.1:5000/api/billing"
TOKENS = {
    "TOKEN": ("user_123", None),
    "USER_TOKEN": ("user_123", None),
    "SERVICE_TOKEN": ("api_gateway", SERVICE_SCOPE),
    "ADMIN_TOKEN": ("ops_admin", ADMIN_SCOPE),
}
SETUPS = {"host-app", "app-without-credits", "continues"}
ERROR_KEYS = {"code", "message", "requestId", "details"}
MAPPED = re.compile(r"^(?:ctx|hold|req|grant)_[0-9a-f]{24}$")
ETAG = re.compile(r'^"[0-9a-f]{32}"$')
# NAME=$(date …): a shell variable the page sets from the date.
ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=\$\((date [^()`;|&$]*)\)$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


# --- reading a page ------------------------------------------------------------------


@dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str
    directive: str | None


@dataclass
class Status:
    page: str
    line: int
    code: int
    phrase: str
    headers: dict[str, str]
    directive: str | None


@dataclass
class Curl:
    page: str
    line: int
    command: str


@dataclass
class Shown:
    """A response shown on the page."""

    status: Status | None
    body: Block | None = None


@dataclass
class Exchange:
    curl: Curl
    responses: list[Shown] = field(default_factory=list)


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*snippet:\s*(\S+)\s*-->\s*$")
_STATUS_LINE = re.compile(r"^\s*`(\d{3}) ([A-Za-z][A-Za-z' -]*)`(.*)$")
_HEADER_SPAN = re.compile(r"`([A-Za-z][A-Za-z0-9-]*): ([^`]+)`")
_RAW_STATUS = re.compile(r"^HTTP/1\.[01] (\d{3}) (.+)$")


def _directive(lines: list[str], index: int) -> str | None:
    """The snippet directive on the nearest non-blank line above ``index``."""
    for line in reversed(lines[:index]):
        if line.strip():
            match = _DIRECTIVE.match(line)
            return match.group(1) if match else None
    return None


def read_page(path: Path) -> list[Block | Status]:
    """The page's fenced blocks and status lines, in order."""
    page = path.relative_to(ROOT).as_posix()
    lines = path.read_text().splitlines()
    events: list[Block | Status] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence:
            indent, marks, lang = fence.groups()
            body: list[str] = []
            end = index + 1
            while end < len(lines) and not (
                lines[end].strip().startswith(marks) and set(lines[end].strip()) == {marks[0]}
            ):
                body.append(lines[end][len(indent) :] if lines[end].startswith(indent) else "")
                end += 1
            text = "\n".join(body)
            directive = _directive(lines, index)
            raw = _RAW_STATUS.match(body[0]) if body else None
            if raw and not lang:
                headers = dict(
                    part.split(": ", 1) for part in body[1:] if ": " in part and part.strip()
                )
                status = int(raw.group(1))
                events.append(Status(page, index + 1, status, raw.group(2), headers, directive))
            else:
                events.append(Block(page, index + 1, lang, text, directive))
            index = end + 1
            continue
        status_line = _STATUS_LINE.match(line)
        if status_line:
            code, phrase, rest = status_line.groups()
            headers = dict(_HEADER_SPAN.findall(rest))
            directive = _directive(lines, index)
            events.append(Status(page, index + 1, int(code), phrase, headers, directive))
        index += 1
    return events


def _complete(command: str) -> bool:
    """Whether ``command`` closes every quote it opens."""
    try:
        shlex.split(command, comments=True)
    except ValueError:
        return False
    return True


def _credits_cli(command: str) -> list[str] | None:
    """The arguments after ``flask [--app X]`` of a ``flask … credits …`` command."""
    if not command.startswith("flask ") or not _complete(command):
        return None
    args = shlex.split(command, comments=True)[1:]
    if args[:1] == ["--app"]:
        args = args[2:]
    return args if args[:1] == ["credits"] else None


def curl_commands(block: Block) -> list[Curl]:
    """The curl commands of a shell block (continuation lines joined)."""
    if block.lang not in ("sh", "bash", "shell", "console"):
        return []
    commands = []
    lines = block.text.splitlines()
    index = 0
    while index < len(lines):
        start = index
        command = lines[index]
        while index + 1 < len(lines) and (command.endswith("\\") or not _complete(command)):
            index += 1
            if command.endswith("\\"):
                command = command[:-1] + " " + lines[index].strip()
            else:  # a newline inside quotes
                command = command + "\n" + lines[index]
        command = command.strip().removeprefix("$ ")
        if (
            command.startswith("curl ")
            or _credits_cli(command) is not None
            or ASSIGNMENT.match(command)
        ):
            commands.append(Curl(block.page, block.line + 1 + start, command))
        index += 1
    return commands


@dataclass
class Examples:
    exchanges: list[Exchange]
    illustrations: list[Shown]
    unmarked: list[str]


def examples(events: list[Block | Status]) -> Examples:
    """Pair each curl command with the responses shown for it; the rest of
    the statuses and JSON blocks are illustrations. A status that follows a
    command's response unmarked is neither: it is reported."""
    exchanges: list[Exchange] = []
    illustrations: list[Shown] = []
    unmarked: list[str] = []
    previous: Curl | Status | Block | None = None
    current: Exchange | None = None
    for event in events:
        if isinstance(event, Status):
            if current is not None and (not current.responses or event.directive == "again"):
                current.responses.append(Shown(event))
            else:
                if current is not None and event.directive != "illustration":
                    unmarked.append(
                        f"{event.page}:{event.line}: a second response to the command of "
                        f"line {current.curl.line}: mark it <!-- snippet: again --> (sent "
                        "again) or <!-- snippet: illustration --> (not replayed)"
                    )
                illustrations.append(Shown(event))
            previous = event
            continue
        commands = curl_commands(event)
        if commands:
            for command in commands:
                current = Exchange(command)
                exchanges.append(current)
            previous = commands[-1]
            continue
        if event.lang == "json":
            if isinstance(previous, Status):
                target = (current.responses if current else []) + illustrations
                shown = next(s for s in reversed(target) if s.status is previous)
                shown.body = event
            elif isinstance(previous, Curl) and current is not None and not current.responses:
                current.responses.append(Shown(None, event))
            else:
                illustrations.append(Shown(None, event))
        previous = event
    return Examples(exchanges, illustrations, unmarked)


# --- apps -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def migrated_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each app gets a copy of."""
    path = tmp_path_factory.mktemp("docs-template") / "credits.sqlite3"
    engine = sa.create_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    engine.dispose()
    return path


class Apps:
    """Fresh host apps on copies of the migrated file; disposed at the end."""

    def __init__(self, template: Path, folder: Path) -> None:
        self.template = template
        self.folder = folder
        self.built: list[Flask] = []

    def host(self, *, register: bool = True) -> tuple[Flask, SQLAlchemy]:
        path = self.folder / f"host-{len(self.built)}.sqlite3"
        shutil.copy(self.template, path)
        app = Flask("docs_host")
        app.config.update(
            TESTING=True, SQLALCHEMY_DATABASE_URI=f"sqlite:///{path}", JWT_SECRET_KEY=SECRET
        )
        db = SQLAlchemy(app)
        JWTManager(app)
        if register:
            app.register_blueprint(credits_bp, url_prefix="/api/billing")
        self.built.append(app)
        return app, db

    def dispose(self) -> None:
        for app in self.built:
            with app.app_context():
                app.extensions["sqlalchemy"].engine.dispose()


@pytest.fixture
def apps(migrated_file: Path, tmp_path: Path) -> Iterator[Apps]:
    built = Apps(migrated_file, tmp_path)
    yield built
    built.dispose()


# --- the cases -----------------------------------------------------------------------


def _python_chains() -> list[Any]:
    """Each Python block with the blocks that continue it, as one case."""
    cases = []
    for path in PAGES:
        chain: list[Block] = []
        for event in read_page(path):
            if not isinstance(event, Block) or event.lang != "python":
                continue
            if event.directive == "continues" and chain:
                chain.append(event)
                continue
            if chain:
                cases.append(chain)
            chain = [event]
        if chain:
            cases.append(chain)
    return [_case(f"{chain[0].page}:{chain[0].line}", chain) for chain in cases]


def _http_pages() -> list[Any]:
    cases = []
    for path in PAGES:
        exchanges = examples(read_page(path)).exchanges
        if exchanges:
            first = exchanges[0].curl
            cases.append(_case(f"{first.page}:{first.line}", exchanges))
    return cases


def _illustrated_pages() -> list[Any]:
    return [pytest.param(examples(read_page(path)), id=path.name) for path in PAGES]


def _case(case_id: str, value: Any) -> Any:
    return pytest.param(value, id=case_id)


def test_the_convention_is_used_as_documented():
    """Only known directives, and the tokens api.md declares are the ones replayed."""
    for path in PAGES:
        for line in path.read_text().splitlines():
            match = _DIRECTIVE.match(line)
            if match:
                assert match.group(1) in SETUPS | {"again", "illustration"}, (path.name, line)
    declared = re.findall(
        r"^(\w+_TOKEN)=\.\.\.\s+# sub=(\w+),?\s*(?:scope=\"([^\"]*)\")?",
        (ROOT / "docs" / "api.md").read_text(),
        re.M,
    )
    assert len(declared) == 3
    for name, subject, scope in declared:
        assert TOKENS[name] == (subject, scope or None), name


# --- Python blocks ----------------------------------------------------------------------


@pytest.mark.parametrize("chain", _python_chains())
def test_python_block_runs(chain: list[Block], apps: Apps, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    head = chain[0]
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    with contextlib.ExitStack() as stack:
        if head.directive in ("host-app", "app-without-credits"):
            app, db = apps.host(register=head.directive == "host-app")
            namespace.update(app=app, db=db)
            stack.enter_context(app.app_context())
        else:
            assert head.directive is None, f"{head.page}:{head.line}: a chain needs a head"
        for block in chain:
            code = compile(block.text, f"{block.page}:{block.line}", "exec")
            exec(code, namespace)  # noqa: S102  (the docs' own snippets)


# --- HTTP examples ----------------------------------------------------------------------


def _expand(command: str, ids: dict[str, str], variables: dict[str, str] | None = None) -> str:
    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "BASE":
            return BASE
        if variables and name in variables:
            return variables[name]
        assert name in TOKENS, f"unknown variable ${name}"
        subject, scopes = TOKENS[name]
        return make_token(subject, scopes=scopes)

    command = re.sub(r"\$\{?(\w+)\}?", variable, command)
    for shown in sorted(ids, key=len, reverse=True):
        command = command.replace(shown, ids[shown])
    return command


def _request(command: str) -> dict[str, Any]:
    args = shlex.split(command)
    assert args[0] == "curl"
    request: dict[str, Any] = {"method": None, "headers": {}, "data": None, "url": None}
    index = 1
    while index < len(args):
        arg = args[index]
        if arg == "|":
            break
        if arg in ("-s", "-i", "-sS", "-si"):
            pass
        elif arg == "-X":
            index += 1
            request["method"] = args[index]
        elif arg == "-H":
            index += 1
            name, _, value = args[index].partition(":")
            request["headers"][name.strip()] = value.strip()
        elif arg in ("-d", "--data", "--data-raw"):
            index += 1
            request["data"] = args[index]
        elif arg.startswith("http"):
            request["url"] = arg
        else:
            raise AssertionError(f"curl option {arg!r} is not replayed")
        index += 1
    request["method"] = request["method"] or ("POST" if request["data"] is not None else "GET")
    return request


def _map(shown: str, actual: Any, ids: dict[str, str], where: str) -> None:
    assert isinstance(actual, str), where
    if shown in ids:
        assert ids[shown] == actual, f"{where}: {shown} was {ids[shown]}, now {actual}"
    else:
        assert actual not in ids.values(), f"{where}: {actual} already shown as another id"
        ids[shown] = actual


def compare(shown: Any, actual: Any, ids: dict[str, str], where: str = "body") -> None:
    """``actual`` is what the page shows, up to ids, cursors and times."""
    if isinstance(shown, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r}"
        assert set(actual) == set(shown), f"{where}: keys {sorted(actual)} != {sorted(shown)}"
        for key, value in shown.items():
            compare(value, actual[key], ids, f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(actual, list), f"{where}: {actual!r}"
        assert len(actual) == len(shown), f"{where}: {len(actual)} items, {len(shown)} shown"
        for index, (one, other) in enumerate(zip(shown, actual, strict=True)):
            compare(one, other, ids, f"{where}[{index}]")
    elif isinstance(shown, str) and (MAPPED.match(shown) or where.endswith(".next_cursor")):
        _map(shown, actual, ids, where)
    elif isinstance(shown, str) and TIMESTAMP.match(shown):
        assert isinstance(actual, str), f"{where}: {actual!r}"
        assert TIMESTAMP.match(actual), f"{where}: {actual!r}"
    else:
        assert type(actual) is type(shown), f"{where}: {actual!r}"
        assert actual == shown, f"{where}: {actual!r}"


@pytest.mark.parametrize("exchanges", _http_pages())
def test_http_examples_replay(exchanges: list[Exchange], apps: Apps) -> None:
    app, _ = apps.host()
    client = app.test_client()
    ids: dict[str, str] = {}
    variables: dict[str, str] = {}
    for exchange in exchanges:
        where = f"{exchange.curl.page}:{exchange.curl.line}"
        assignment = ASSIGNMENT.match(exchange.curl.command)
        if assignment is not None:
            # The page's own date command, run as the reader's shell runs it.
            name, date_command = assignment.groups()
            args = shlex.split(date_command)
            assert args[0] == "date", where
            done = subprocess.run(args, capture_output=True, text=True, check=True)
            variables[name] = done.stdout.strip()
            assert not exchange.responses, f"{where}: an assignment has no response"
            continue
        cli = _credits_cli(exchange.curl.command)
        if cli is not None:
            # A `flask credits …` step of the page, run on the same app.
            result = app.test_cli_runner().invoke(args=cli)
            assert result.exit_code == 0, f"{where}: {result.output}"
            continue
        for shown in exchange.responses or [None]:
            sent = _request(_expand(exchange.curl.command, ids, variables))
            url = urlsplit(sent["url"])
            response = client.open(
                url.path + (f"?{url.query}" if url.query else ""),
                method=sent["method"],
                headers=sent["headers"],
                data=sent["data"],
            )
            text = response.get_data(as_text=True)[:300]
            if shown is None or shown.status is None:
                assert 200 <= response.status_code < 300, f"{where}: {response.status_code} {text}"
            else:
                assert response.status_code == shown.status.code, f"{where}: {text}"
                for name, value in shown.status.headers.items():
                    assert name in response.headers, f"{where}: no {name} header"
                    if ETAG.match(value):
                        _map(value, response.headers[name], ids, f"{where}: {name}")
                    elif MAPPED.match(value):
                        assert MAPPED.match(response.headers[name]), f"{where}: {name}"
                    else:
                        assert response.headers[name] == value, f"{where}: {name}"
            if shown is not None and shown.body is not None:
                compare(json.loads(shown.body.text), response.get_json(), ids, where)


# --- illustrations -----------------------------------------------------------------------


@pytest.mark.parametrize("page", _illustrated_pages())
def test_illustrations_are_true(page: Examples) -> None:
    assert not page.unmarked, page.unmarked
    statuses = error_statuses()
    for shown in page.illustrations:
        if shown.status is not None:
            status = shown.status
            where = f"{status.page}:{status.line}"
            assert status.phrase.lower() == HTTP_STATUS_CODES[status.code].lower(), where
        if shown.body is None:
            continue
        where = f"{shown.body.page}:{shown.body.line}"
        body = json.loads(shown.body.text)
        if not (isinstance(body, dict) and "code" in body and "requestId" in body):
            continue
        assert set(body) == ERROR_KEYS, where
        assert body["code"] in statuses, where
        assert MAPPED.match(body["requestId"]), where
        assert isinstance(body["details"], list), where
        if shown.status is not None:
            assert statuses[body["code"]] == shown.status.code, where


def test_every_shown_status_phrase_is_the_servers():
    """Status lines paired with commands use the server's reason phrase too."""
    for path in PAGES:
        exchanges = examples(read_page(path)).exchanges
        for exchange in exchanges:
            for shown in exchange.responses:
                if shown.status is not None:
                    where = f"{shown.status.page}:{shown.status.line}"
                    expected = HTTP_STATUS_CODES[shown.status.code].lower()
                    assert shown.status.phrase.lower() == expected, where
