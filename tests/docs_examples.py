"""Run the code blocks of README.md and docs/*.md, and check the output they show.

A page's ```bash and ```python blocks run in order against a server (`localhost:8000` and
`127.0.0.1:8000` in them become its address), and its ```yaml blocks are validated as server configs
(server/settings.py); a block right under `<!-- docs-test: skip (why) -->` does not run. Other languages
(text, plain fences) are not run.

What is checked:
- bash: every command exits 0 (`curl` gets `--fail-with-body`, except a command whose documented output
  is an `{"error": ...}` body). The output a comment shows after a command (on its lines or on the comment
  lines below it), if it is JSON, is matched against the command's JSON output field by field.
- python: the blocks of one page share one namespace; a `print(...)` line with a trailing comment must
  print what the comment shows (JSON or a Python literal matched field by field, else text).

In a documented output `...` stands for anything: `"..."`, `{...}` and `[...]` for one value, a last
`, ...` in an object or a list for more keys or items. An object without it must have exactly its keys.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<why>.+)\)\s*-->")
RUN_LANGUAGES = ("bash", "python", "yaml")
DOCUMENTED_URLS = ("localhost:8000", "127.0.0.1:8000")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    language: str
    code: str
    skip: str | None  # why it does not run, from the marker above it

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def collect(path: Path) -> list[Block]:
    """The fenced bash and python blocks of a Markdown file, with their skip markers."""
    tokens = MarkdownIt("commonmark").parse(path.read_text(encoding="utf-8"))
    blocks = []
    for i, token in enumerate(tokens):
        if token.type != "fence" or token.info.strip() not in RUN_LANGUAGES:
            continue
        before = tokens[i - 1] if i else None
        marker = SKIP.search(before.content) if before is not None and before.type == "html_block" else None
        blocks.append(Block(path, token.map[0] + 2, token.info.strip(), token.content,
                            marker.group("why").strip() if marker else None))  # fmt: skip
    return blocks


# -----------------------------------------------------------------------------
# documented outputs: JSON with `...`

ANY = "\x00any"
MORE = "\x00more"


def parse_documented(text: str) -> Any:
    """A documented JSON output (the text may go on after it) -> a template for `matches`; None if the text
    does not start with JSON."""
    text = text.strip()
    if not text.startswith(("{", "[")):
        return None
    text = re.sub(r",\s*\.\.\.\s*}", lambda _: f", {json.dumps(MORE)}: true}}", text)
    text = re.sub(r",\s*\.\.\.\s*]", lambda _: f", {json.dumps(MORE)}]", text)
    text = re.sub(r"\{\s*\.\.\.\s*}|\[\[\s*\.\.\.\s*]]|\[\s*\.\.\.\s*]|(?<=[:,\[]\s)\.\.\.(?=[,}\]])",
                  lambda _: json.dumps(ANY), text)  # fmt: skip
    text = re.sub(r'"[^"]*\.\.\.[^"]*"(?!\s*:)', lambda m: json.dumps(_pattern(m.group(0)[1:-1])), text)
    value, _ = json.JSONDecoder().raw_decode(text)
    return value


def _pattern(text: str) -> str:
    """A string with `...` in it: any text in place of the dots."""
    return ANY if text == "..." else ANY + text


def _text_matches(expected: str, actual: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, actual, re.DOTALL) is not None


def mismatch(expected: Any, actual: Any, where: str = "") -> str | None:
    """Where `actual` differs from the template `expected`, or None."""
    if expected == ANY:
        return None
    if isinstance(expected, str) and expected.startswith(ANY):
        ok = isinstance(actual, str) and _text_matches(expected[len(ANY):], actual)
        return None if ok else f"{where or 'value'}: {actual!r} does not match {expected[len(ANY):]!r}"
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{where or 'value'}: expected an object, got {actual!r:.80}"
        keys = [k for k in expected if k != MORE]
        for key in keys:
            if key not in actual:
                return f"{where}.{key}: missing (the answer has {sorted(actual)})"
            problem = mismatch(expected[key], actual[key], f"{where}.{key}")
            if problem:
                return problem
        extra = sorted(set(actual) - set(keys))
        if extra and MORE not in expected:
            return f"{where or 'the object'}: fields {extra} are not documented (add them, or end with `, ...}}`)"
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return f"{where or 'value'}: expected a list, got {actual!r:.80}"
        items = [e for e in expected if e != MORE]
        if len(actual) < len(items) or (MORE not in expected and len(actual) != len(items)):
            return f"{where or 'list'}: {len(actual)} items, documented {len(items)}"
        for i, item in enumerate(items):
            problem = mismatch(item, actual[i], f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return None if abs(expected - actual) <= 1e-9 * max(1.0, abs(expected)) else f"{where}: {actual} != {expected}"
    return None if expected == actual and type(expected) is type(actual) else f"{where}: {actual!r} != {expected!r}"


# -----------------------------------------------------------------------------
# bash


@dataclass
class Command:
    line: int
    text: str
    comments: list[str]


def _split_comment(line: str, quote: str | None) -> tuple[str, str | None, str | None]:
    """(code, comment or None, open quote at the end of the line) of one line of shell."""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip(), None
    return line, None, quote


def split_commands(code: str, first_line: int = 1) -> list[Command]:
    commands: list[Command] = []
    current: Command | None = None
    quote = None
    for offset, line in enumerate(code.splitlines()):
        code_part, comment, quote_after = _split_comment(line, quote)
        continuing = current is not None and (quote is not None or current.text.endswith("\\"))
        if code_part.strip() and not continuing:
            current = Command(first_line + offset, code_part, [])
            commands.append(current)
        elif code_part.strip() and current is not None:
            current.text += "\n" + code_part
        if comment is not None and current is not None:
            current.comments.append(comment)
        quote = quote_after
    return commands


def documented_output(comments: list[str]) -> Any:
    """The JSON a command's comments show: from the first comment that starts with { or [, on."""
    for i, comment in enumerate(comments):
        if comment.startswith(("{", "[")):
            return parse_documented("\n".join(comments[i:]))
    return None


SEPARATOR = "\x1edocs-test-command"


def run_bash(block: Block, base_url: str, cwd: Path, timeout: float = 300) -> list[str]:
    """Run a bash block, one shell for the whole block; the problems found, one line each."""
    commands = split_commands(block.code, block.line)
    script = ["set -o pipefail",
              'curl() { if [ "$DOCS_EXPECT_ERROR" = 1 ]; then command curl "$@"; '
              'else command curl --fail-with-body "$@"; fi; }']  # fmt: skip
    expected = []
    for command in commands:
        output = documented_output(command.comments)
        expected.append(output)
        is_error = isinstance(output, dict) and "error" in output
        script += [f"DOCS_EXPECT_ERROR={int(is_error)}", with_url(command.text, base_url),
                   f'printf "\\n{SEPARATOR} %s\\n" "$?"']  # fmt: skip
    # `python` and the project's commands (xlora-serve) are the test's own environment's, as after `make install`;
    # a server an example starts builds no compiled decode step (minutes of CPU, killed with the example).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "XLORA_COMPILE": "false"}  # fmt: skip
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env)  # fmt: skip
    parts = result.stdout.split(SEPARATOR)
    problems = []
    for i, (command, output) in enumerate(zip(commands, expected, strict=True)):
        where = f"{block.path.name}:{command.line}"
        if i + 1 >= len(parts):
            problems.append(f"{where}: did not run (stderr: {result.stderr[-500:]})")
            break
        stdout = parts[i].rstrip("\n") if i == 0 else parts[i].split("\n", 1)[1].rstrip("\n")
        status = int(parts[i + 1].split("\n", 1)[0].strip())
        if status != 0:
            problems.append(f"{where}: exit status {status}: {stdout[-300:]} {result.stderr[-300:]}")
            continue
        if output is None:
            continue
        try:
            actual = json.loads(stdout)
        except json.JSONDecodeError:
            problems.append(f"{where}: the output is not JSON: {stdout[:300]!r}")
            continue
        problem = mismatch(output, actual)
        if problem:
            problems.append(f"{where}: {problem}")
    return problems


def with_url(code: str, base_url: str) -> str:
    host = base_url.split("://", 1)[1]
    for documented in DOCUMENTED_URLS:
        code = code.replace(documented, host)
    return code


# -----------------------------------------------------------------------------
# yaml


def check_config(block: Block) -> list[str]:
    """A yaml block is a server config (or part of one): every key and value must be accepted."""
    import yaml
    from pydantic import ValidationError

    from server.settings import Settings

    try:
        Settings.model_validate(yaml.safe_load(block.code) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        return [f"{block.where}: not a valid config: {exc}"]
    return []


# -----------------------------------------------------------------------------
# python


def printed_comments(code: str) -> dict[int, str]:
    """Line (1-based, in the block) -> the trailing comment of each line that calls print()."""
    comments: dict[int, str] = {}
    prints: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.NAME and token.string == "print":
            prints.add(token.start[0])
        elif token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string[1:].strip()
    return {line: text for line, text in comments.items() if line in prints}


def run_python(block: Block, namespace: dict[str, Any], base_url: str) -> list[str]:
    """Run a python block in the page's namespace; the problems found, one line each."""
    code = with_url(block.code, base_url)
    filename = f"<{block.where}>"
    printed: dict[int, list[str]] = {}

    def record(*args: Any, sep: str = " ", end: str = "\n", **kwargs: Any) -> None:
        frame = sys._getframe(1)
        if frame.f_code.co_filename == filename:
            printed.setdefault(frame.f_lineno, []).append(sep.join(str(a) for a in args) + end)
        print(*args, sep=sep, end=end, **kwargs)

    namespace["print"] = record
    try:
        exec(compile(code, filename, "exec"), namespace)  # noqa: S102 (the docs' own example)
    except Exception as exc:  # noqa: BLE001 (reported with where it happened)
        return [f"{block.where}: raised {type(exc).__name__}: {exc}"]
    problems = []
    for line, comment in printed_comments(code).items():
        where = f"{block.path.name}:{block.line + line - 1}"
        if line not in printed:
            problems.append(f"{where}: printed nothing")
            continue
        actual_text = "".join(printed[line]).strip()
        template = parse_documented(comment) if comment.startswith(("{", "[")) else None
        if template is not None:
            try:
                actual = json.loads(actual_text)
            except json.JSONDecodeError:
                actual = ast.literal_eval(actual_text)
            problem = mismatch(template, actual)
        else:
            problem = None if _text_matches(comment, actual_text) else f"printed {actual_text!r}"
        if problem:
            problems.append(f"{where}: {problem} (documented: {comment})")
    return problems
