"""Config by section, one reader: the same grammar everywhere, sections beside their users, config.py at the root.

The layering specs read the source (its imports), because the promise is
about the code's shape: config.py depends on no feature package, caller
authentication never reaches for provider credentials, and the environment
is read in one place.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

from extproc.config import ConfigError, Reader, parse_config, parse_duration
from extproc.quota.settings import parse_quota

EXTPROC = Path(__file__).resolve().parent.parent / "extproc"

BASE = """
providers:
  openai: {type: openai, api_key: {env: OPENAI_API_KEY}}
models:
  gpt-4o:
    targets: [{provider: openai, model: gpt-4o}]
    per_try_timeout: PER_TRY
quota:
  lease: LEASE
"""


def parse(per_try: str = "60s", lease: str = "10m"):
    text = textwrap.dedent(BASE).replace("PER_TRY", per_try).replace("LEASE", lease)
    return parse_config(text, source="t.yaml", env={"XDG_STATE_HOME": "/nonexistent"})


@pytest.mark.parametrize("text, seconds", [("250ms", 0.25), ("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800),
                                           ("90", 90), ("1.5h", 5400)])
def test_one_duration_grammar_reads_the_same_text_as_the_same_seconds(text, seconds):
    assert parse_duration(text) == seconds


def test_an_hour_loads_as_a_per_try_timeout_and_as_a_quota_lease():
    cfg = parse(per_try="1h", lease="1h")
    assert cfg.models["gpt-4o"].per_try_timeout == 3600
    assert cfg.quota is not None and cfg.quota.lease_seconds == 3600


@pytest.mark.parametrize("per_try, lease, message", [
    ("2h", "10m", "t.yaml: models.gpt-4o.per_try_timeout: expected a duration from above 0 to 1h (line 7)"),
    ("soon", "10m", "t.yaml: models.gpt-4o.per_try_timeout: expected a duration such as 250ms, 30s, 5m, 1h or 7d "
                    "(line 7)"),
    ("60s", "forever", "t.yaml: quota.lease: expected a duration such as 250ms, 30s, 5m, 1h or 7d (line 9)"),
    ("60s", "500ms", "t.yaml: quota.lease: expected a duration from 1s to 1d (line 9)"),
])
def test_a_bad_duration_is_named_with_its_key_and_line_in_every_section(per_try, lease, message):
    with pytest.raises(ConfigError) as caught:
        parse(per_try=per_try, lease=lease)
    assert str(caught.value) == message


def test_a_section_parsed_on_its_own_names_the_key_without_a_line():
    with pytest.raises(ConfigError) as caught:
        parse_quota({"limits": {"teams": {"ml": {"usd_per_dai": 5}}}}, reader=Reader.detached())
    assert str(caught.value).startswith("quota.limits.teams.ml.usd_per_dai: unknown key")


def test_the_quota_section_refuses_an_unpriced_target_model_at_its_line():
    text = textwrap.dedent(BASE).replace("PER_TRY", "60s").replace("LEASE", "10m").replace(
        "model: gpt-4o}", "model: my-private-model}")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t.yaml", env={})
    assert "models.gpt-4o.targets[0].model: no price for model 'my-private-model'" in str(caught.value)
    assert str(caught.value).endswith("(line 6)")


STREAMS = """
providers:
  openai: {type: openai, api_key: {env: OPENAI_API_KEY}}
  anthropic: {type: anthropic, api_key: {env: ANTHROPIC_API_KEY}}
models:
  fast:
    targets: [{provider: openai, model: gpt-4o}, {provider: anthropic, model: claude-sonnet-4-5}]
    stream_chunks: MODE
"""


@pytest.mark.parametrize("mode, message", [
    ("observe", "models.fast.stream_chunks: observe needs targets that answer in OpenAI's stream format; "
                "'anthropic' does not"),
    ("watch", "models.fast.stream_chunks: expected hold or observe, not 'watch'"),
])
def test_an_alias_observes_its_streams_only_when_no_target_needs_its_chunks_rewritten(mode, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(STREAMS).replace("MODE", mode), source="t.yaml", env={})
    assert message in str(caught.value)
    assert str(caught.value).endswith("(line 8)")
    held = parse_config(textwrap.dedent(STREAMS).replace("MODE", "hold"), source="t.yaml", env={})
    assert held.models["fast"].stream_chunks == "hold"


def test_several_workers_refuse_an_observed_alias_whose_meter_stream_could_not_reach_its_owner():
    text = textwrap.dedent("""
        extproc: {port: 50051, workers: 2}
        redis: {url: redis://127.0.0.1:6379}
        providers:
          openai: {type: openai, api_key: {env: OPENAI_API_KEY}}
        models:
          fast: {targets: [{provider: openai, model: gpt-4o}], stream_chunks: observe}
        """)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t.yaml", env={})
    assert str(caught.value).startswith("t.yaml: extproc.workers: several workers cannot meter observed streams "
                                        "yet: models.fast has stream_chunks: observe")
    assert str(caught.value).endswith("(line 2)")
    assert parse_config(text.replace("observe", "hold"), source="t.yaml", env={}).workers == 2


# ---------------------------------------------------------------- the layering


def imports(path: Path, *, at_import_time: bool = True) -> set[str]:
    """Modules ``path`` imports; with ``at_import_time``, leaving out TYPE_CHECKING blocks and function bodies."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                if not at_import_time:
                    visit(node.body)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not at_import_time:
                    visit(node.body)

    visit(tree.body)
    if not at_import_time:
        found.update(n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module)
    return found


def test_config_py_imports_no_feature_package_when_it_loads():
    ours = {m for m in imports(EXTPROC / "config.py") if m.startswith("extproc")}
    assert ours == set()


def test_caller_authentication_does_not_depend_on_provider_credentials():
    for path in sorted((EXTPROC / "auth").glob("*.py")):
        reached = {m for m in imports(path, at_import_time=False) if m.startswith("extproc.credentials")}
        assert reached == set(), f"{path.name} imports {reached}"


def test_the_environment_is_read_in_config_py_only():
    readers = sorted(str(p.relative_to(EXTPROC)) for p in EXTPROC.rglob("*.py")
                     if re.search(r"os\.environ|os\.getenv|getenv\(", p.read_text()))
    assert readers == ["config.py"]
