"""Every `python -m flows.<name> ...` command shown in README.md and cluster/README.md composes with its
flow's Hydra config into a valid typed config, so a newcomer copying one gets a run, not a config error.
Nothing is loaded or run: models, data and URLs are only named."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from flows._common import to_config
from tests.conftest import REPO, compose

DOCS = [REPO / "README.md", REPO / "cluster" / "README.md"]
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def _commands() -> list[tuple[str, str, list[str]]]:
    """(where, flow, overrides) for each flow command in the docs' bash blocks; a multirun takes the first
    value of each swept key."""
    found = []
    for doc in DOCS:
        for block in BLOCK.findall(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                for i in range(len(tokens) - 2):
                    if (
                        tokens[i].startswith("python")
                        and tokens[i + 1] == "-m"
                        and tokens[i + 2].startswith("flows.")
                    ):
                        flow = tokens[i + 2].removeprefix("flows.")
                        rest = [t for t in tokens[i + 3 :] if t != "-m"]
                        found.append(
                            (f"{doc.name}: {line.strip()[:90]}", flow, [_first_value(t) for t in rest])
                        )
    return found


def _filled(token: str) -> str:
    """Placeholders filled in: each <...id> by its own MLflow-style run id, any other by x."""
    count = iter(range(1, 100))
    return re.sub(r"<[^>]*>", lambda m: f"{next(count):032x}" if m[0].endswith("id>") else "x", token)


def _first_value(token: str) -> str:
    """The override as a user would run it: a placeholder (<hub-id>) filled in, one value of a sweep."""
    key, _, value = _filled(token).partition("=")
    if "," in value and not value.startswith("["):
        value = value.split(",")[0]
    return f"{key}={value}"


COMMANDS = _commands()


def test_the_docs_show_every_flow():
    assert {flow for _, flow, _ in COMMANDS} == {"abliterate", "sweep", "finetune", "replay", "compare"}


@pytest.mark.parametrize("where,flow,overrides", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_builds_a_valid_config(where, flow, overrides):
    module = importlib.import_module(f"flows.{flow}")  # registers the flow's schema
    schema = next(v for k, v in vars(module).items() if k.lower() == f"{flow}config")
    to_config(compose(flow, overrides), schema)
