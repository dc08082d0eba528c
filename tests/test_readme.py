"""The README's quick start is what CI runs, so it cannot drift."""

import re

from conftest import REPO


def quick_start() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    main_job, tests = quick_start()
    assert "collapse-lab ablate" in main_job and "scripts/setup.sh" in main_job  # the lab's main job
    assert "pytest" in tests and "scripts/setup.sh" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci
    assert "exit 1" in ci.split('"$rc" -eq 5', 1)[1]  # no tests collected fails CI


def test_setup_installs_the_cpu_torch_on_cpu_machines():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "torch==2.13.0" in setup and "nvidia-smi" in setup
    assert '".[test]"' in setup
