"""The README's commands and code are what the project really runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    lines = [line for line in README.splitlines() if line.strip()]
    assert lines[0].startswith("# ") and lines[1] == "```bash", "the README opens with the commands block"
    end = lines.index("```", 2)
    return lines[2:end]


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_second():
    commands = readme_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, ".ci/run must run exactly the README's test command"


def test_readme_layer_section_runs(capsys):
    section = README.split("## Use the layer in your JAX project", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one Python block"
    exec(compile(blocks[0], "README.md:Use the layer", "exec"), {"__name__": "readme"})
    assert "merged == adapted for task 2" in capsys.readouterr().out
