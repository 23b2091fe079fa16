"""Every example in README.md, docs/*.md and plugins/*/README.md, run as a reader would run it.

Fenced blocks are found by their language:

* ``python``: the blocks of one file run in order, as one script, in a fresh interpreter whose
  working directory is a new empty directory. A line ending in ``# prints: TEXT`` says what the
  script prints there: the script's output must be exactly those lines, in that order (``...`` in
  TEXT matches anything).
* ``console``, ``sh``, ``bash``: each ``$ command`` runs with ``bash`` at the repository's root (a
  block without ``$`` prompts is one command per line; ``#`` comments are stripped); the lines after
  a command are what it prints, matched line by line with runs of spaces collapsed (``...`` in a
  line matches anything; a line that is only ``...`` matches any number of lines). A command
  without lines after it must only succeed.
* anything else (``text``, ``json``, ``toml``) is an illustration and is not run.

An HTML comment on the line before a block says how to treat it, several separated by ``;``:

* ``<!-- test: skip: why -->``: not run here; ``why`` is required, and says why in one line (the
  rest of the comment);
* ``<!-- test: file NAME -->``: the block is not run but written to ``NAME`` in a directory on the
  ``PYTHONPATH`` of the file's other blocks (a module that a later block imports);
* ``<!-- test: celery -->``: needs Redis and RabbitMQ (``.ci/services.sh``): runs in the ``celery``
  lane only. A ``celery ... worker`` command in such a block is started in the background, and the
  next command runs once the worker answers ``inspect ping``;
* ``<!-- test: slow -->``: takes long: runs in the ``slow`` lane only;
* ``<!-- test: numbers vary -->``: in the output shown, a number matches any number (timings,
  thread counts), so the block can show a real run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "plugins").glob("*/README.md"))]
SHELLS = {"console", "sh", "bash", "shell"}
ILLUSTRATIONS = {"text", "json", "toml", "ini", "yaml", ""}
MARKER = re.compile(r"<!--\s*test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")
PRINTS = re.compile(r"#\s*prints:\s?(.*)$")


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None
    file: str | None = None
    lanes: tuple[str, ...] = ()
    numbers_vary: bool = False

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` with the markers before them."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        block = Block(path, start + 1, fence.group(1), "\n".join(body) + "\n")
        before = lines[start - 1] if start else ""
        marker = MARKER.search(before)
        if marker:
            text = marker.group(1)
            parts = [] if text.startswith("skip") else [p.strip() for p in text.split(";")]
            if text.startswith("skip"):  # the reason is the rest of the comment, semicolons and all
                block.skip = text.partition(":")[2].strip()
                assert block.skip, f"{block.where}: 'skip' needs a reason: <!-- test: skip: why -->"
            for part in parts:
                if part.startswith("file "):
                    block.file = part.split(None, 1)[1]
                elif part == "numbers vary":
                    block.numbers_vary = True
                elif part in ("celery", "slow"):
                    block.lanes += (part,)
                else:
                    raise AssertionError(f"{block.where}: unknown marker {part!r}")
        found.append(block)
    return found


ALL = [b for path in DOCS for b in blocks(path)]


def _lane_marks(lanes: tuple[str, ...]) -> list[pytest.MarkDecorator]:
    marks = []
    if lanes:
        marks.append(pytest.mark.slow)
    if "celery" in lanes:
        marks.append(pytest.mark.celery)
    return marks


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir), env.get("PYTHONPATH")]))
    env.pop("COLUMNS", None)
    env["COLUMNS"] = "80"  # what a reader's terminal shows, and what the examples are written for
    return env


def _write_files(path: Path, workdir: Path, lane: tuple[str, ...]) -> None:
    for block in blocks(path):
        if block.file and not block.skip and set(block.lanes) <= set(lane):
            (workdir / block.file).write_text(block.text)


# -- matching output ----------------------------------------------------------------------------


def _squash(line: str) -> str:
    return " ".join(line.split())


NUMBER = re.compile(r"\d[\d,.]*")


def _line_pattern(expected: str, numbers_vary: bool = False) -> re.Pattern[str]:
    parts = []
    for part in _squash(expected).split("..."):
        if numbers_vary:
            part = NUMBER.sub("\0", part)  # a placeholder re.escape leaves alone
            part = re.escape(part).replace("\0", r"\d[\d,.]*")
        else:
            part = re.escape(part)
        parts.append(part)
    return re.compile(".*".join(parts) + r"\Z")


def matches(expected: list[str], actual: list[str], numbers_vary: bool = False) -> bool:
    """Whether ``actual`` lines match ``expected`` ones (see the module's docstring)."""
    actual = [_squash(line) for line in actual if line.strip()]
    expected = [line for line in expected if line.strip()]

    def match(e: int, a: int) -> bool:
        if e == len(expected):
            return a == len(actual)
        if _squash(expected[e]) == "...":
            return any(match(e + 1, k) for k in range(a, len(actual) + 1))
        pattern = _line_pattern(expected[e], numbers_vary)
        return a < len(actual) and bool(pattern.match(actual[a])) and match(e + 1, a + 1)

    return match(0, 0)


def test_matching_rules() -> None:
    assert matches(["1024", "500"], ["1024", "500"])
    assert not matches(["1024"], ["1024", "500"])
    assert matches(["│ a │ ... │", "..."], ["│  a   │ 3 s │", "x", "y"])
    assert matches(["...", "done"], ["done"])
    assert not matches(["x ... y"], ["x z"])
    assert matches(["│ 3/3 in 0.04 s │ 1,352 │"], ["│  12/12 in 10.5 s │ 999 │"], numbers_vary=True)
    assert not matches(["│ 3/3 in 0.04 s │"], ["│ 3/3 in a s │"], numbers_vary=True)
    assert not matches(["3/3 in 0.04 s"], ["3/3 in 1.04 s"])


# -- python -------------------------------------------------------------------------------------


def _python_cases() -> list[object]:
    cases = []
    for path in DOCS:
        python = [b for b in blocks(path) if b.lang == "python" and not b.skip and not b.file]
        for lane in sorted({b.lanes for b in python}):
            name = str(path.relative_to(ROOT)) + "".join(f"-{part}" for part in lane)
            cases.append(pytest.param(path, lane, id=name, marks=_lane_marks(lane)))
    return cases


@pytest.mark.parametrize(("path", "lane"), _python_cases())
def test_python_blocks_print_what_the_text_says(path: Path, lane: tuple[str, ...], tmp_path: Path) -> None:
    # The lane's blocks, and those of no lane before them (a celery example may use earlier ones).
    python = [b for b in blocks(path) if b.lang == "python" and not b.skip and not b.file
              and set(b.lanes) <= set(lane)]
    _write_files(path, tmp_path, lane)
    script = "".join(f"# {b.where}\n{b.text}" for b in python)
    expected = [m.group(1) for line in script.splitlines() if (m := PRINTS.search(line))]
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"{path.relative_to(ROOT)}: the examples failed:\n{proc.stderr[-4000:]}"
    assert matches(expected, proc.stdout.splitlines()), (
        f"{path.relative_to(ROOT)}: printed\n{proc.stdout}\nwhere the text says\n" + "\n".join(expected))


# -- shell --------------------------------------------------------------------------------------


def commands(block: Block) -> list[tuple[str, list[str]]]:
    """``(command, the lines it shows)`` for each command of a shell block."""
    if not any(line.startswith("$ ") for line in block.text.splitlines()):
        return [(line, []) for line in (_uncomment(raw) for raw in block.text.splitlines()) if line]
    out: list[tuple[str, list[str]]] = []
    pending = ""
    for raw in block.text.splitlines():
        if pending:  # a continued command
            pending += "\n" + raw
            if not raw.endswith("\\"):
                out.append((_uncomment(pending), []))
                pending = ""
        elif raw.startswith("$ "):
            if raw.endswith("\\"):
                pending = raw[2:]
            else:
                out.append((_uncomment(raw[2:]), []))
        elif out:
            out[-1][1].append(raw)
    return out


def _uncomment(command: str) -> str:
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return command.strip()
    if not words:
        return ""
    # keep the command as written up to its comment: shlex only tells where the comment starts
    cut = command
    for i, ch in enumerate(command):
        if ch == "#" and (i == 0 or command[i - 1].isspace()):
            head = command[:i]
            try:
                if shlex.split(head) == words:
                    cut = head
                    break
            except ValueError:
                continue
    return cut.strip()


def _shell_cases() -> list[object]:
    return [pytest.param(b, id=b.where, marks=_lane_marks(b.lanes))
            for b in ALL if b.lang in SHELLS and not b.skip and not b.file]


@pytest.mark.parametrize("block", _shell_cases())
def test_shell_blocks_show_what_the_text_says(block: Block, tmp_path: Path) -> None:
    _write_files(block.path, tmp_path, block.lanes)
    env = _env(tmp_path)
    background: list[subprocess.Popen[bytes]] = []
    try:
        for command, shown in commands(block):
            if "celery" in block.lanes and re.match(r"(\S+=\S+\s+)*celery\b.*\bworker\b", command):
                background.append(_start_worker(command, env, tmp_path))
                continue
            proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=150)
            assert proc.returncode == 0, f"{block.where}: `{command}` failed:\n{proc.stderr[-4000:]}"
            if shown:
                assert matches(shown, proc.stdout.splitlines(), block.numbers_vary), (
                    f"{block.where}: `{command}` printed\n{proc.stdout}\nwhere the text shows\n"
                    + "\n".join(shown))
    finally:
        for worker in background:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def _start_worker(command: str, env: dict[str, str], workdir: Path) -> subprocess.Popen[bytes]:
    worker = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=workdir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app = re.search(r"-A\s+(\S+)", command)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"`{command}` exited with {worker.returncode}"
        ping = subprocess.run(["celery", "-A", app.group(1) if app else "proj", "inspect", "ping", "-t", "2"],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
        if ping.returncode == 0 and "pong" in ping.stdout:
            return worker
        time.sleep(0.5)
    worker.kill()
    raise AssertionError(f"`{command}` did not answer inspect ping within 60 s")


# -- every block is accounted for ---------------------------------------------------------------


def test_every_block_is_run_or_says_why_not() -> None:
    for block in ALL:
        known = block.lang == "python" or block.lang in SHELLS or block.lang in ILLUSTRATIONS
        assert known, f"{block.where}: unknown block language {block.lang!r}"
    runnable = [b for b in ALL if b.lang == "python" or b.lang in SHELLS]
    assert runnable and all(b.skip is None or b.skip for b in runnable)


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``."""
    headings = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_lead_to_files_and_headings_that_exist() -> None:
    for path in DOCS:
        for target, anchor in LINK.findall(path.read_text()):
            if "://" in target:
                continue
            where = path.parent / target
            assert where.exists(), f"{path.relative_to(ROOT)}: link to missing {target}"
            if anchor:
                assert anchor[1:] in _anchors(where), f"{path.relative_to(ROOT)}: no heading {target}{anchor}"


def test_the_landing_commands_are_run() -> None:
    run = " ".join(command for b in ALL if b.lang in SHELLS and not b.skip for command, _ in commands(b))
    assert "cmwq-exec --version" in run
    assert "cmwq-exec demo --quick" in run
