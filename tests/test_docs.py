"""The docs are checked, so that they cannot go stale unnoticed: the site builds with `mkdocs build --strict` (no
broken link or anchor), its generated reference lists every config group, option and registered model, the README's
install and test commands are CI's, and the code blocks marked `<!-- check: ... -->` run (docs/design.md, Checked
docs)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

import autoencoders  # noqa: F401  (the resolvers and schemas, as train.py registers them)
from autoencoders import reference
from autoencoders.cli import refuse_unreadable_overrides
from autoencoders.config import check_settings

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARK = re.compile(r"<!-- check: (?P<how>[^>]*?) -->\n(?P<fence>```(?P<lang>\w*)\n(?P<code>.*?)```)?", re.DOTALL)
HOWS = ("compose", "run")


def marked_blocks() -> list:
    """Each marked block as a pytest param, (how, lang, code), with its page and line as the id."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in MARK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            block = (match["how"], match["lang"], match["code"])
            blocks.append(pytest.param(*block, id=f"{page.relative_to(ROOT)}:{line}"))
    return blocks


BLOCKS = marked_blocks()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)]
    done = subprocess.run(
        build, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def reference_page(site: Path) -> str:
    return (site / "reference" / "index.html").read_text()


@pytest.mark.parametrize("group", reference.groups())
def test_the_reference_lists_every_group_and_its_options(reference_page, group):
    assert f'id="{reference._anchor(group)}"' in reference_page
    for option in (ROOT / "conf" / group).glob("*.yaml"):
        assert f'id="{reference._anchor(group, option.stem)}"' in reference_page, option


def test_the_reference_lists_every_setting_with_its_range(reference_page):
    assert "<code>model.commitment</code>" in reference_page and "a weight &gt;= 0" in reference_page
    for app in reference.APPS:
        for setting in reference.top_level(app):
            assert f"<code>{setting.key}</code>" in reference_page, setting


@pytest.mark.slow  # imports torch
def test_the_reference_names_the_class_of_every_registered_model(reference_page):
    """Every model class of the package is built by an option of conf/model, or is a base of those that are (not the
    subclasses that other tests in this process define, which register themselves too)."""
    from autoencoders.models import MODELS

    built = set(re.findall(r"Builds <code>autoencoders\.models\.(\w+)</code>", reference_page))
    for name, cls in MODELS.items():
        if not cls.__module__.startswith("autoencoders."):
            continue
        assert name in built or any(issubclass(MODELS[b], cls) for b in built if b in MODELS), name


@pytest.mark.slow
@pytest.mark.parametrize("app", reference.APPS)
def test_help_prints_the_groups_and_settings_of_the_reference(app):
    """`--help` comes from the same source as the reference: evaluate.py lists only the groups it composes."""
    done = subprocess.run([sys.executable, f"{app}.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    groups = re.findall(r"^  ([\w/]+): ", done.stdout.split("Config groups")[1].split("\n\n")[0], re.MULTILINE)
    assert groups == list(reference.defaults(app))
    for setting in reference.top_level(app):
        assert f"  {setting.key}={setting.default}" in done.stdout


def test_the_configure_page_lists_every_group_and_option():
    page = (ROOT / "docs" / "guides" / "configure.md").read_text()
    rows = dict(re.findall(r"^\| `([\w/]+)` \| (.*?) \|", page, re.MULTILINE))
    for group in reference.groups():
        for option in (ROOT / "conf" / group).glob("*.yaml"):
            assert re.search(rf"`({group}/)?{option.stem}`", rows[group]), option


def test_the_readme_install_and_test_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Install and test") :]
    block = section[section.index("```bash\n") + 8 : section.index("```\n", section.index("```bash"))]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    ci = (ROOT / ".ci" / "run").read_text().split("source .venv-ci/bin/activate\n")[1]
    assert commands == ci.strip().splitlines()


def test_the_readmes_links_into_the_docs_resolve():
    """mkdocs checks the docs' own links; the README, outside the site, links to their files and headings."""
    readme = (ROOT / "README.md").read_text()
    for path, anchor in re.findall(r"\]\((docs/[^)#]+)#?([^)]*)\)", readme):
        assert (ROOT / path).is_file(), path
        if not anchor:
            continue
        headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.MULTILINE)
        slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
        assert anchor in slugs, f"{path}#{anchor}"


def test_every_check_mark_is_above_a_bash_block():
    for param in BLOCKS:
        how, lang, code = param.values
        assert how in HOWS and lang == "bash" and code, param.id


def commands(code: str) -> list[list[str]]:
    """The `python train.py` and `python evaluate.py` commands of a block, as their words (continued lines joined,
    comments dropped, a placeholder such as `<run>` taken as a name)."""
    code = re.sub(r"<[^<>\n]*>", "x", code.replace("\\\n", " "))
    lines = [shlex.split(line, comments=True) for line in code.splitlines()]
    return [words for words in lines if words[:1] == ["python"] and words[1] in ("train.py", "evaluate.py")]


def each_value(overrides: list[str]) -> list[list[str]]:
    """A sweep's overrides as single runs that together take each value of each swept key once."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = [o.input_line if not o.is_sweep_override() else f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
             for o in parsed]  # fmt: skip
    runs = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            runs += [
                first[:i] + [f"{o.get_key_element()}={v}"] + first[i + 1 :] for v in list(o.sweep_string_iterator())[1:]
            ]
    return runs


@pytest.mark.slow  # a tenth of a second a command, some 80 of them
@pytest.mark.parametrize(("how", "lang", "code"), [b for b in BLOCKS if b.values[0] == "compose"])
def test_a_compose_block_composes_with_every_value_in_range(how, lang, code):
    """Each command composes as its entry point composes it (Hydra: every option and key exists), and its values pass
    the entry point's first check (config.check_settings), without training."""
    assert commands(code), "a compose block with no train.py or evaluate.py command"
    for words in commands(code):
        flags_with_values = {"--cfg", "-c", "--package", "-p"}
        overrides = [
            w for i, w in enumerate(words[2:], 2) if not w.startswith("-") and words[i - 1] not in flags_with_values
        ]
        refuse_unreadable_overrides(overrides)
        for run in each_value(overrides):
            with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(Path(words[1]).stem, run, return_hydra_config=True)
            check_settings(cfg)


@pytest.mark.slow  # each command a process, a second or more
@pytest.mark.parametrize(("how", "lang", "code"), [b for b in BLOCKS if b.values[0] == "run"])
def test_a_run_block_runs(how, lang, code, tmp_path):
    """The block as it is, in a folder of its own holding only links to the entry points and conf/."""
    for name in ("train.py", "evaluate.py", "conf"):
        (tmp_path / name).symlink_to(ROOT / name)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
