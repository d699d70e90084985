"""Every `python -m jobs.*` command in the README (and cluster/README.md) is one the job accepts:
its settings compose through Hydra and pass the job's schema, as they would before anything
starts. The commands' effects are exercised by the other tests (the pipeline, serving, export,
batch scoring, registry and cluster tests run the same commands as subprocesses); this test
catches a README that drifts from the config tree: a renamed key, a removed group, a bad value."""
from __future__ import annotations

import re
import shlex

import pytest

from mlops_ray.config import train_job_schema, validate
from mlops_ray.config.batch import ExportJob, PredictJob
from mlops_ray.config.compose import compose
from mlops_ray.config.evaluate import EvaluateJob, PromoteJob
from mlops_ray.config.pipeline import MonitorJob, PipelineJob
from mlops_ray.config.serve import ServeJob
from mlops_ray.config.tune import TuneJob
from mlops_ray.errors import ConfigError
from tests.conftest import REPO

pytestmark = pytest.mark.slow

HYDRA_JOBS = {"train": ("train", None), "tune": ("tune", TuneJob),
              "evaluate": ("evaluate", EvaluateJob), "promote": ("promote", PromoteJob),
              "pipeline": ("pipeline", PipelineJob), "monitor": ("monitor", MonitorJob),
              "serve": ("serve", ServeJob), "export": ("export", ExportJob),
              "predict": ("predict", PredictJob)}


def readme_commands() -> list[tuple[str, str]]:
    cmds = []
    for doc in ("README.md", "cluster/README.md"):
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


# commands the README shows failing, with the error it shows
EXPECTED_ERRORS = {"optim.lr=abc": "optim.lr='abc'"}
NEEDS_GPU = "GPU"  # validation checks this machine's GPUs when no ray.address is given


COMMANDS = readme_commands()


def test_the_readme_shows_every_job():
    shown = {c.split()[2].removeprefix("jobs.") for _, c in COMMANDS}
    assert set(HYDRA_JOBS) | {"registry"} <= shown, shown


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[c[:80] for _, c in COMMANDS])
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
        if job == "monitor" and not any(a.startswith("monitor.new_data=") for a in overrides):
            overrides.append("monitor.new_data=x.parquet")  # shown as `...` in the README
        composed = compose(name, overrides)
        validate(composed, schema or train_job_schema(composed))
    elif job == "registry":
        from jobs.registry import parser
        flags = [a for a in args if "=" not in a or a.startswith("--")]
        parser().parse_args(flags)
    else:
        pytest.fail(f"{doc}: unknown job in `{command}`")
