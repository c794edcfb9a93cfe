"""mkdocs hook: the command-line reference, generated at build time from the Typer app.

``typer.main.get_command(anomalens.cli.app)`` gives the command tree (Typer >= 0.29 carries its own copy
of click, so mkdocs-click cannot read it); every command becomes a section of ``reference/cli.md`` with
its usage line, its help text and a table of its arguments and options. Nothing is written into
``docs/``: the page is added to the build as a generated file.
"""

from __future__ import annotations

import typing
from pathlib import Path

from mkdocs.structure.files import File

PAGE = "reference/cli.md"


def _type_label(param) -> str:
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    origin = typing.get_origin(ann)
    if origin in (list, tuple) and args:
        return _name(args[0]) + "..."
    if args and origin is typing.Union:
        ann = args[0]
    return _name(ann)


def _name(ann) -> str:
    if ann is None:
        return ""
    if ann is bool:
        return "flag"
    if isinstance(ann, type) and issubclass(ann, Path):
        return "PATH"
    return {int: "INTEGER", float: "FLOAT", str: "TEXT"}.get(ann, getattr(ann, "__name__", str(ann)).upper())


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _help(text: str | None) -> str:
    """Help text as Markdown: click's ``\\b`` (keep line breaks) markers dropped, paragraphs kept."""
    if not text:
        return ""
    paras = [p.replace("\b", "").strip() for p in text.strip().split("\n\n")]
    return "\n\n".join(" ".join(p.split()) for p in paras if p)


def _default(param) -> str:
    if getattr(param, "required", False):
        return "required"
    d = param.default
    if d is None or d == () or d == [] or callable(d):
        return ""
    if isinstance(d, bool) and param.secondary_opts:
        return param.opts[0] if d else param.secondary_opts[0]
    if isinstance(d, bool):
        return "on" if d else "off"
    return f"`{d}`"


def _usage(path: str, cmd) -> str:
    pieces = [path]
    if any(getattr(p, "opts", None) and p.opts[0].startswith("-") for p in cmd.params):
        pieces.append("[OPTIONS]")
    for p in cmd.params:
        if not p.opts[0].startswith("-"):
            name = p.name.upper()
            pieces.append(name + "..." if p.nargs == -1 else name)
    if hasattr(cmd, "commands"):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _section(path: str, cmd, level: int) -> list[str]:
    out = [f"{'#' * level} `{path}`", "", "```", _usage(path, cmd), "```", ""]
    if cmd.help:
        out += [_help(cmd.help), ""]
    params = [p for p in cmd.params if not getattr(p, "hidden", False)]
    args = [p for p in params if not p.opts[0].startswith("-")]
    opts = [p for p in params if p.opts[0].startswith("-")]
    if args:
        out += ["| argument | type | | description |", "|---|---|---|---|"]
        for p in args:
            req = "required" if p.required else "optional"
            out.append(f"| `{p.name.upper()}` | {_type_label(p)} | {req} | {_cell(getattr(p, 'help', '') or '')} |")
        out.append("")
    if opts:
        out += ["| option | type | default | description |", "|---|---|---|---|"]
        for p in opts:
            names = ", ".join(f"`{o}`" for o in p.opts + list(p.secondary_opts))
            out.append(f"| {names} | {_type_label(p)} | {_default(p)} | {_cell(getattr(p, 'help', '') or '')} |")
        out.append("")
    for name, sub in getattr(cmd, "commands", {}).items():
        if not getattr(sub, "hidden", False):
            out += _section(f"{path} {name}", sub, min(level + 1, 4))
    return out


def render() -> str:
    """The whole reference page as Markdown."""
    import typer

    from anomalens.cli import app

    root = typer.main.get_command(app)
    lines = [
        "# Command-line reference",
        "",
        "Generated from the command-line application itself (`anomalens.cli.app`) when this site was built,",
        "so it lists exactly the commands and options of the installed version. `anomalens COMMAND --help`",
        "prints the same text in the terminal; `python -m anomalens` is the same program.",
        "",
    ]
    lines += _section("anomalens", root, 2)
    return "\n".join(lines) + "\n"


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=render()))
    return files
