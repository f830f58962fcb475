"""The README's two opening commands stay true: CI runs the second one verbatim."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _opening_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    return blocks[:2]


def test_ci_runs_the_readme_test_command_verbatim():
    _, test_command = _opening_commands()
    ci_lines = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == test_command


def test_readme_main_command_sweeps_the_quick_file_and_evaluates():
    main_command, _ = _opening_commands()
    assert "retina sweep sweeps/quick.yaml" in main_command
    assert main_command.endswith("retina best --evaluate")
    assert (REPO / "sweeps" / "quick.yaml").exists()
