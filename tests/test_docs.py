"""The docs say what the code does: generated references are current, links resolve, every
``mechmed`` command and option shown exists, and every YAML config shown loads.

Fast: no model is loaded (the CLI parser, the config schema and yaml only).
"""

from __future__ import annotations

import difflib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
REGENERATE = "python docs/gen_reference.py"

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_INLINE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SEPARATORS = {"|", "||", "&&", ";", ">", ">>", "2>", "&"}
_NOT_SHELL = {"yaml", "yml", "json", "python", "py", "toml"}
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*:?$")


GEN = load_script(DOCS / "gen_reference.py")


def _rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def _split(text: str) -> tuple[list[tuple[str, str, int]], list[tuple[str, int]]]:
    """A Markdown page as (fenced code blocks [(info, body, first line)], prose lines [(line, number)])."""
    blocks, prose = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            prose.append((lines[i], i + 1))
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).lower()
        body, start = [], i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        blocks.append((info, "\n".join(body), start))
    return blocks, prose


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = _LINK.sub(lambda m: m.group(0).split("](")[0].lstrip("!["), heading)
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line, _ in _split(path.read_text(encoding="utf-8"))[1]:
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# ------------------------------------------------------------------ (a) generated references


@pytest.mark.parametrize("name", sorted(GEN.PAGES))
def test_generated_reference_is_current(name):
    expected = GEN.PAGES[name]()
    path = DOCS / name
    actual = path.read_text(encoding="utf-8") if path.is_file() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 f"docs/{name} (committed)", f"docs/{name} (from the code)"))[:40])
        pytest.fail(f"docs/{name} is out of date with the code; regenerate it with `{REGENERATE}`\n{diff}")


# ------------------------------------------------------------------ (b) links


def _links(path: Path):
    for line, number in _split(path.read_text(encoding="utf-8"))[1]:
        for target in _LINK.findall(_INLINE.sub("", line)):
            yield target, number


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target, number in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{_rel(page)}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{_rel(page)}:{number}: {target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_index_links_every_page():
    linked = {Path(t.partition("#")[0]).name for t, _ in _links(DOCS / "index.md")}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "index.md" and p.name not in linked]
    assert not missing, f"docs/index.md does not link {', '.join(missing)}"


# ------------------------------------------------------------------ (c) commands and options


@pytest.fixture(scope="module")
def cli():
    """(top-level option strings, {command: its option strings}) from mechmed.cli.build_parser()."""
    from mechmed.cli import build_parser

    parser = build_parser()
    top = {s for a in parser._actions for s in a.option_strings}
    return top, {name: {s for a in sub._actions for s in a.option_strings}
                 for name, _, sub in GEN._subcommands(parser)}


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return command.split()


def invocations(text: str):
    """(command, [options]) of every ``mechmed COMMAND ...`` (or ``-m mechmed.cli COMMAND``) in ``text``."""
    tokens = _tokens(text)
    for i, tok in enumerate(tokens):
        if tok not in ("mechmed", "mechmed.cli") or i + 1 >= len(tokens):
            continue
        command, options = tokens[i + 1], []
        if command.startswith("-"):
            yield None, [command.split("=")[0]]
            continue
        if _PLACEHOLDER.match(command):
            continue
        for t in tokens[i + 2:]:
            if t in _SEPARATORS or t in ("mechmed", "mechmed.cli"):
                break
            if re.match(r"^--?[A-Za-z]", t):
                options.append(t.split("=")[0])
        yield command, options


def _shell_lines(body: str):
    return body.replace("\\\n", " ").splitlines()


def _check(top, commands, command, options, where, problems):
    if command is None:
        problems.extend(f"{where}: `mechmed {o}`: no such global option" for o in options if o not in top)
        return
    if command not in commands:
        problems.append(f"{where}: `mechmed {command}`: no such command (have {', '.join(commands)})")
        return
    problems.extend(f"{where}: `mechmed {command} {o}`: no such option" for o in options
                    if o not in commands[command])


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_commands_and_options_exist(page, cli):
    top, commands = cli
    every_option = top.union(*commands.values())
    blocks, prose = _split(page.read_text(encoding="utf-8"))
    problems: list[str] = []
    for info, body, start in blocks:
        if info in _NOT_SHELL:
            continue
        for k, line in enumerate(_shell_lines(body)):
            for command, options in invocations(line):
                _check(top, commands, command, options, f"{_rel(page)}:{start + k}", problems)
    for line, number in prose:
        for _, span in _INLINE.findall(line):
            span = span.strip()
            if span.startswith("mechmed "):
                for command, options in invocations(span):
                    _check(top, commands, command, options, f"{_rel(page)}:{number}", problems)
            elif re.match(r"^--[a-z0-9-]+(\s|$)", span):  # an option on its own (other tools' use '_')
                opt = span.split()[0]
                if opt not in every_option:
                    problems.append(f"{_rel(page)}:{number}: `{opt}`: no mechmed command has this option")
    assert not problems, "\n".join(problems)


def test_command_scanner_finds_invocations():
    found = list(invocations('accelerate launch --num_processes 4 -m mechmed.cli train --config "a b.yaml" '
                             "--bf16 --out runs/x | tee log  # a comment --nope"))
    assert found == [("train", ["--config", "--bf16", "--out"])]
    assert list(invocations("mechmed --version")) == [(None, ["--version"])]
    assert list(invocations("mechmed COMMAND: error: ...")) == []


# ------------------------------------------------------------------ (d) YAML configs


def yaml_blocks():
    for page in PAGES:
        for info, body, start in _split(page.read_text(encoding="utf-8"))[0]:
            if info in ("yaml", "yml"):
                yield pytest.param(body, id=f"{_rel(page)}:{start}")


def load_config_block(body: str):
    """Load a YAML block with the project's loaders: an ablation file (it has ``train:``) or a
    training config (a snippet gets ``layers: [0]`` when it names none, the one required field)."""
    from mechmed.ablate import AblationConfig
    from mechmed.config import TrainConfig

    data = yaml.safe_load(body)
    assert isinstance(data, dict), "a config block must be a mapping of option: value"
    if "train" in data:
        train = data["train"]
        if isinstance(train, str):  # a file path, relative to the YAML file: check the grid's keys only
            train = {"layers": [0]}
        return AblationConfig.from_dict({**data, "train": train}, source="docs")
    return TrainConfig.from_dict({"layers": [0], **data}, source="docs")


@pytest.mark.parametrize("body", list(yaml_blocks()))
def test_yaml_config_blocks_load(body):
    load_config_block(body)


def test_yaml_loader_rejects_unknown_keys():
    from mechmed.errors import MechmedError

    with pytest.raises(MechmedError, match="did you mean 'rank'"):
        load_config_block("rnak: 8\n")
    with pytest.raises(MechmedError, match="unknown option .seed.; did you mean .seeds."):
        load_config_block("train: x.yaml\nseed: [0]\n")
