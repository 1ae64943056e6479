"""The configuration reference, generated from the code so that it cannot go stale: every config group, option and
setting with its type, default, range and help, read from the structured configs (config.py: each field's type and
`Rule`, and OPEN_GROUP_RULES) and from conf/*.yaml (the values and their comments). One source serves two readers:
the docs' reference page (`on_files`, a hook of mkdocs.yml) and `python train.py --help` / `python evaluate.py
--help` (`help_text`, the `reference` resolver of conf/hydra/help/).

Imports no torch: --help must stay fast."""

import dataclasses
import html
import json
import re
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from autoencoders import config

CONF = Path(__file__).resolve().parent.parent / "conf"
APPS = ("train", "evaluate")  # conf/<app>.yaml, the entry points' primary configs
# `key: value  # comment`; a `#` starts a comment only after whitespace (YAML's rule), and values here hold no quotes
# with `#` in them
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*):(?P<value>.*?)(?P<comment>(?<=\s)#.*)?$")


@dataclass
class Setting:
    key: str  # as typed on the command line: model.kl_weight
    type: str
    default: str
    range: str
    help: str


@dataclass
class Option:
    group: str  # model, hydra/launcher
    name: str
    about: str  # the file's leading comment
    builds: str  # its _target_
    settings: list[Setting]


def groups() -> list[str]:
    """Every config group: each folder of conf/ with option files (hydra/help is --help's own text, not a choice)."""
    found = {path.parent.relative_to(CONF).as_posix() for path in CONF.rglob("*/*.yaml")}
    return sorted(found - {"hydra/help"})


def options(group: str) -> list[Option]:
    return [_option(group, path) for path in sorted((CONF / group).glob("*.yaml"))]


def top_level(app: str) -> list[Setting]:
    """The settings of conf/<app>.yaml itself (Hydra's own `hydra.*` left out)."""
    path = CONF / f"{app}.yaml"
    return [s for s in _settings(path, "", _schema(path)) if not s.key.startswith("hydra.")]


def defaults(app: str) -> dict[str, str | None]:
    """Each config group an app composes, and its default option (None: none), with the groups that its options'
    defaults lists reach (experiment=transfer's /transfer and /hydra/sweeper)."""
    found = {g: o for g, o in _defaults_list(CONF / f"{app}.yaml") if g in groups()}
    pending = list(found)
    while pending:
        for group, _ in _defaults_list(*(CONF / pending.pop()).glob("*.yaml")):
            if group in groups() and group not in found:
                found[group] = None
                pending.append(group)
    return dict(sorted(found.items()))


def _defaults_list(*paths: Path) -> list[tuple[str, str | None]]:
    """(group, option) of each entry of the yamls' defaults lists; group "" for a schema or the yaml's own group."""
    entries = [e for path in paths for e in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", [])]
    pairs = [entry.rpartition("/")[::2] if isinstance(entry, str) else next(iter(entry.items())) for entry in entries]
    return [(group.removeprefix("override ").strip("/"), option) for group, option in pairs]


def _option(group: str, path: Path) -> Option:
    text = path.read_text()
    about, _ = _comments(path)
    prefix = "" if "# @package _global_" in text else group.replace("/", ".")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    builds = values.get("_target_", "") if isinstance(values, dict) else ""
    return Option(group, path.stem, about, builds, _settings(path, prefix, _schema(path)))


def _schema(path: Path) -> type | None:
    """The structured config a yaml merges in through its defaults list (`/model_vae_schema@_here_`, `train_schema`)."""
    for _, option in _defaults_list(path):
        name = str(option).removesuffix("@_here_")
        if name.endswith("_schema"):
            return OmegaConf.get_type(ConfigStore.instance().repo[f"{name}.yaml"].node)
    return None


def _settings(path: Path, prefix: str, schema: type | None) -> list[Setting]:
    _, notes = _comments(path)
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    values.pop("defaults", None)
    fields = dict(_typed_fields(schema, prefix)) if schema else {}
    settings = []
    for key, value in _leaves(values, prefix):
        kind, rule = fields.get(key, (None, None))
        if rule is None:
            group, _, name = key.rpartition(".")
            rule = config.OPEN_GROUP_RULES.get(group, {}).get(name)
        if rule is None and kind == "float":
            rule = config.FINITE
        if kind is None:
            kind = _value_type(value)
        comment = notes.get(key.removeprefix(f"{prefix}.") if prefix else key, "")
        help_text = "; ".join(filter(None, [comment.rstrip("."), rule.note if rule else ""]))
        settings.append(Setting(key, kind, _shown(value), rule.allowed() if rule else "", help_text))
    return settings


def _typed_fields(schema: type, prefix: str) -> Iterator[tuple[str, tuple[str, config.Rule | None]]]:
    """Each field of a schema, nested schemas (evaluate.yaml's fid, images) by their fields, with its type and rule."""
    rules, _ = config._rules(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(f.type):
            yield from _typed_fields(f.type, key)
        elif f.type is not Any:
            yield key, (_type_name(f.type), rules[f.name])


def _type_name(annotation: Any) -> str:
    return (
        annotation.__name__
        if isinstance(annotation, type) and not getattr(annotation, "__args__", None)
        else str(annotation).replace("NoneType", "None")
    )


def _value_type(value: Any) -> str:
    if isinstance(value, str) and "${" in value:
        return ""  # an interpolation: the type of what it names
    return {type(None): "", list: "list", dict: "dict"}.get(type(value), type(value).__name__)


def _leaves(values: Mapping, prefix: str) -> Iterator[tuple[str, Any]]:
    """Each setting of a yaml as a dotted key and its value (unresolved); `_target_`, `_partial_` are no settings."""
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if str(name).startswith("_"):
            continue
        if isinstance(value, dict) and value:
            yield from _leaves(value, key)
        else:
            yield key, value


def _shown(value: Any) -> str:
    """A value as typed on the command line."""
    if isinstance(value, list):
        return f"[{','.join(map(_shown, value))}]"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def _comments(path: Path) -> tuple[str, dict[str, str]]:
    """A yaml's leading comment, before its first setting (what the option is), and each key's comment: the full-line
    comments just above it, then the comment after it on its line, continued by the comment lines aligned with it."""
    about: list[str] = []
    notes: dict[str, str] = {}
    above: list[str] = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the keys enclosing the next line
    last, column, started = "", -1, False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if stripped.startswith("# @package"):
                continue
            if last and line.index("#") == column:
                notes[last] += " " + text
            elif started:
                above.append(text)
            else:
                about.append(text)
            continue
        column = -1
        match = _KEY_LINE.match(line)
        if not stripped or not match or match["key"] == "defaults":
            above = [] if not stripped else above
            continue
        started, indent = True, len(match["indent"])
        parents = [(i, k) for i, k in parents if i < indent]
        key = ".".join([k for _, k in parents] + [match["key"]])
        parents.append((indent, match["key"]))
        comment = (match["comment"] or "").lstrip("#").strip()
        notes[key] = " ".join(above + [comment]).strip()
        above, last = [], key
        if match["comment"]:
            column = line.index(match["comment"])
    return "\n".join(about), notes


def markdown() -> str:
    """The reference page."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `autoencoders/config.py` (each setting's type and range) and `conf/*.yaml` (its default and "
        "the comment beside it) whenever the docs are built, by `autoencoders/reference.py`, which also prints "
        "`python train.py --help` and `python evaluate.py --help`. Set any setting with `key=value`; pick an "
        "option of a group with `group=option` (`+group=option` for `callbacks`, which adds to the defaults). "
        "A value outside its range stops the command before anything is written, with an `error:` naming it.",
        "",
    ]
    for app in APPS:
        lines += [
            f"## `{app}.py` settings {{#{app}}}",
            "",
            f"`conf/{app}.yaml`. Groups it composes (default option in bold):",
            "",
        ]
        lines += [f"- [`{g}`](#{_anchor(g)}): {_choices(g, d, '**{}**')}" for g, d in defaults(app).items()]
        lines += ["", *_table(top_level(app)), ""]
    lines += ["## Config groups", ""]
    for group in groups():
        lines += [f"### `{group}` {{#{_anchor(group)}}}", "", f"Options: {_choices(group, None, '{}')}.", ""]
        for option in options(group):
            lines += [f"#### `{group}={option.name}` {{#{_anchor(group, option.name)}}}", ""]
            lines += [_text(option.about).replace("\n", "  \n"), ""] * bool(option.about)
            lines += [f"Builds `{option.builds}`.", ""] * bool(option.builds)
            lines += [*(_table(option.settings) if option.settings else ["No settings of its own."]), ""]
    return "\n".join(lines)


def _anchor(*parts: str) -> str:
    return "-".join(part.replace("/", "-").replace("_", "-") for part in parts)


def _choices(group: str, default: str | None, emphasis: str) -> str:
    names = [option.stem for option in sorted((CONF / group).glob("*.yaml"))]
    return ", ".join(emphasis.format(f"`{n}`") if n == default else f"`{n}`" for n in names)


def _table(settings: list[Setting]) -> list[str]:
    rows = [f"| `{s.key}` | {_text(s.type)} | `{s.default}` | {_text(s.range)} | {_text(s.help)} |" for s in settings]
    return ["| setting | type | default | range | help |", "|---|---|---|---|---|", *rows]


def _text(text: str) -> str:
    """Plain text as Markdown shows it: `<run>` is no HTML tag, `beta*KL` no emphasis, `|` no table cell's end."""
    return html.escape(text, quote=False).replace("*", "\\*").replace("|", "\\|")


def help_text(app: str, choices: Mapping[str, Any] | DictConfig) -> str:
    """`python <app>.py --help`: its groups and options, then its own settings and those of the options chosen on
    this command line (`python train.py model=vqvae --help` shows the VQ-VAE's). `$` is doubled, as Hydra's help
    template is a string.Template."""
    chosen = {g: c for g in defaults(app) if (c := choices.get(g)) and (CONF / g / f"{c}.yaml").is_file()}
    lines = [
        f"python {app}.py [group=option ...] [key=value ...]",
        "  --cfg job prints the composed config without running; --hydra-help lists Hydra's own flags.",
        "  Every option's settings: the docs' configuration reference (mkdocs serve), made from the same source.",
        "",
        "Config groups (group=option; * the default):",
        *(f"  {group}: {_choices(group, default, '{}*')}".replace("`", "") for group, default in defaults(app).items()),
        "",
        f"Settings (key=value), of {app}.py and of the options chosen "
        f"({', '.join(f'{g}={c}' for g, c in chosen.items()) or 'none'}):",
    ]
    settings = top_level(app) + [
        s for group, choice in chosen.items() for o in options(group) if o.name == choice for s in o.settings
    ]
    for s in settings:
        about = "; ".join(filter(None, [s.type, s.range, s.help])) or " "
        left = f"  {s.key}={s.default}"
        lines += [left] * (len(left) >= 35)
        first = f"{left:<36}" if len(left) < 35 else " " * 36
        lines.append(textwrap.fill(about, 118, initial_indent=first, subsequent_indent=" " * 36))
    return "\n".join(lines).replace("$", "$$")


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook (mkdocs.yml `hooks:`): adds the generated reference.md to the site's pages."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, "reference.md", content=markdown()))
    return files
