"""Every `python -m jobs.*` command in the README, the guides under docs/ (and cluster/README.md)
is one the job accepts: its settings compose through Hydra and pass the job's schema, as they
would before anything starts. The commands' effects are exercised by the other tests (the
pipeline, serving, export, batch scoring, registry and cluster tests run the same commands as
subprocesses); this test catches a README or guide that drifts from the config tree: a renamed
key, a removed group, a bad value. Every relative link of the README and the guides points at a
file that exists (and, with `#anchor`, at one of its headings)."""
from __future__ import annotations

import re
import shlex

import pytest

from mlops_ray.config import train_job_schema, validate
from mlops_ray.config.batch import ExportJob, PredictJob
from mlops_ray.config.compose import compose
from mlops_ray.config.evaluate import EvaluateJob, PromoteJob
from mlops_ray.config.pipeline import LabelsJob, MonitorJob, PipelineJob
from mlops_ray.config.serve import ServeJob
from mlops_ray.config.train import FeaturesJob
from mlops_ray.config.tune import TuneJob
from mlops_ray.errors import ConfigError
from tests.conftest import REPO

pytestmark = pytest.mark.slow

HYDRA_JOBS = {"train": ("train", None), "tune": ("tune", TuneJob),
              "evaluate": ("evaluate", EvaluateJob), "promote": ("promote", PromoteJob),
              "pipeline": ("pipeline", PipelineJob), "monitor": ("monitor", MonitorJob),
              "serve": ("serve", ServeJob), "export": ("export", ExportJob),
              "predict": ("predict", PredictJob), "labels": ("labels", LabelsJob),
              "features": ("features", FeaturesJob)}


GUIDES = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
DOCS = ["README.md", "cluster/README.md", *GUIDES]  # where commands are collected
LINKED = ["README.md", *GUIDES]  # whose relative links must resolve


def readme_commands() -> list[tuple[str, str]]:
    cmds = []
    for doc in DOCS:
        lang, block = None, []
        for line in (REPO / doc).read_text().splitlines():
            if line.startswith("```"):
                if lang is None:  # an opening fence
                    lang, block = line[3:].strip(), []
                    continue
                if lang in ("", "bash", "sh"):
                    for cmd in "\n".join(block).replace("\\\n", " ").splitlines():
                        cmd = cmd.strip().removeprefix("$ ")
                        if "python -m jobs." in cmd:
                            cmds.append((doc, cmd[cmd.index("python -m jobs."):]))
                lang = None
            elif lang is not None:
                block.append(line)
    return cmds


def concrete(command: str) -> list[str]:
    """The words of a command, README placeholders (<run>, <head>, key=...) -> sample values,
    Hydra's own flags (--cfg job) dropped."""
    words = shlex.split(re.sub(r"<[^>]+>", "x", command), comments=True)
    out, skip = [], False
    for w in words[3:]:
        if skip or w == "...":
            skip = False
            continue
        if w in ("--cfg", "-c", "--package", "-p"):
            skip = True  # the flag's value follows
            continue
        out.append(w[:-3] + "x" if w.endswith("=...") else w)
    return out


# commands the README or a guide shows failing (docs/configuration.md), with the error it shows
EXPECTED_ERRORS = {"optim.lr=abc": "optim.lr='abc'"}
NEEDS_GPU = "GPU"  # validation checks this machine's GPUs when no ray.address is given


COMMANDS = readme_commands()


def test_the_readme_shows_every_job():
    shown = {c.split()[2].removeprefix("jobs.") for _, c in COMMANDS}
    assert set(HYDRA_JOBS) | {"registry"} <= shown, shown


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{c[:80]}" for d, c in COMMANDS])
def test_readme_command_is_accepted(doc, command):
    job = command.split()[2].removeprefix("jobs.")
    args = concrete(command)
    expected = next((e for k, e in EXPECTED_ERRORS.items() if k in command), None)
    try:
        accept(doc, command, job, args)
    except ConfigError as e:
        if expected:
            assert expected in str(e)
            return
        if "scaling=gpu" in command and NEEDS_GPU in str(e) and "this machine has 0" in str(e):
            pytest.skip(f"needs a GPU to validate here (resources are checked): {e}")
        raise
    assert expected is None, f"{doc}: `{command}` should fail with {expected}"


def accept(doc: str, command: str, job: str, args: list[str]) -> None:
    if job in HYDRA_JOBS:
        name, schema = HYDRA_JOBS[job]
        overrides = [a for a in args if not a.startswith("--")]
        composed = compose(name, overrides)
        validate(composed, schema or train_job_schema(composed))
    elif job == "registry":
        from jobs.registry import parser
        flags = [a for a in args if "=" not in a or a.startswith("--")]
        parser().parse_args(flags)
    else:
        pytest.fail(f"{doc}: unknown job in `{command}`")


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks and inline code spans (links there are text)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def anchors(path) -> set[str]:
    """GitHub's ids for the headings of a Markdown file (outside code blocks): the heading's
    text in lower case, punctuation dropped, spaces -> '-'; '-1', '-2' ... for repeats."""
    ids: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links() -> list[tuple[str, str]]:
    links = []
    for doc in LINKED:
        for target in LINK.findall(prose((REPO / doc).read_text())):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                links.append((doc, target))
    return links


LINKS = relative_links()


def test_the_guides_link_each_other():
    assert LINKS and GUIDES, "README.md links to no guide under docs/"
    linked = {str(((REPO / doc).parent / t.split("#")[0]).resolve().relative_to(REPO))
              for doc, t in LINKS if t.split("#")[0]}
    assert set(GUIDES) <= linked, f"guides no page links to: {sorted(set(GUIDES) - linked)}"


@pytest.mark.parametrize("doc,target", LINKS, ids=[f"{d}->{t}" for d, t in LINKS])
def test_relative_link_resolves(doc, target):
    path, _, anchor = target.partition("#")
    dest = ((REPO / doc).parent / path).resolve() if path else REPO / doc
    assert dest.exists(), f"{doc}: link ({target}) points at {dest}, which does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), (
            f"{doc}: link ({target}): {dest.name} has no heading with the id #{anchor}")
