"""What a reader of the repository relies on: short lines, the method within its line budget, and no
reference to a file the repository lacks or to how the work was scheduled."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD = ["sharedllm.py", "tree.py", "load_llama.py", "train.py", "generate.py"]


def test_no_line_of_the_code_runs_past_100_columns():
    wide = [f"{name}:{i} ({len(line)})" for name in METHOD + ["eval.py", "data.py"]
            for i, line in enumerate((ROOT / name).read_text().splitlines(), 1) if len(line) > 100]
    assert not wide, f"lines over 100 columns: {wide}"


def test_the_method_files_stay_within_their_line_budget():
    lines = sum(len((ROOT / name).read_text().splitlines()) for name in METHOD)
    assert lines <= 1900, f"the five method files have {lines} lines; the budget is 1,900"


def test_the_repository_cites_only_itself_and_the_paper():
    texts = [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("tests/*.py"), *ROOT.glob("adapters/*.json")]
    cited = {f.name for f in texts}
    bad = []
    for f in texts:
        text = f.read_text()
        bad += [f"{f.name}: {m}" for m in re.findall(r"\b[A-Z]+\.md\b", text) if m not in cited]
        if f.name != "test_style.py":
            bad += [f"{f.name}: {m}" for m in re.findall(r"\bissue \d+|\b\w+ session\b", text, re.I)
                    if "pytest" not in m and m.lower() != "scope session"]
    assert not bad, bad
