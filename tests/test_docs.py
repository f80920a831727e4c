"""The documentation: the mkdocs site builds with no warning, and the READMEs' links resolve.

``mkdocs build --strict`` (``mkdocs.yml``: every link between pages and every anchor
validated, the API reference generated from the docstrings by static analysis) fails
on any warning; the test also fails on a warning line that did not fail the build.
The READMEs are read on GitHub, outside the site: each relative link of theirs must
name a file or folder of the checkout.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "results/README.md")

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)


def relative_links(markdown: str) -> list[str]:
    """The targets of the inline and reference links outside code, without external URLs."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    targets = LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", t, re.I)]


def test_relative_links_finds_links_outside_code():
    text = (
        "See [a](docs/a.md#x), ![img](b.png) and [c](https://x.org/c).\n"
        "`[not](a link)`\n```\n[nor](this)\n```\n[ref]: results/README.md\n"
    )
    assert relative_links(text) == ["docs/a.md#x", "b.png", "results/README.md"]


@pytest.mark.parametrize("readme", READMES)
def test_readme_relative_links_point_at_files(readme):
    path = ROOT / readme
    links = relative_links(path.read_text(encoding="utf-8"))
    assert links, f"{readme} has no relative link: is the parser broken?"
    missing = []
    for link in links:
        target = link.split("#", 1)[0].split("?", 1)[0]
        if target and not (path.parent / target).exists():
            missing.append(link)
    assert not missing, f"{readme} links to files that do not exist: {missing}"


def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    warnings = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert done.returncode == 0 and not warnings, output[-6000:]
    for page in ("index.html", "api/losses/index.html", "architecture/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # the API reference is generated from the docstrings, not left as "::: ood_jax.losses"
    api = (tmp_path / "site" / "api" / "losses" / "index.html").read_text(encoding="utf-8")
    assert "logitnorm_loss" in api and ":::" not in api


def test_ci_runs_exactly_the_readmes_set_up_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Test\n") :]
    block = section[section.index("```bash\n") + 8 : section.index("```\n", 8)]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["bash .ci/setup", ". .venv/bin/activate && python -m pytest tests"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [line for line in ci if line and not line.startswith("#")]
    assert ci.index("bash .ci/setup") < ci.index(". .venv/bin/activate")
    assert ci.index(". .venv/bin/activate") < ci.index("python -m pytest tests")
    setup = (ROOT / ".ci" / "setup").read_text()
    assert "--target .ci/libtpu" in setup and "requirements-test.txt -c constraints.txt" in setup
