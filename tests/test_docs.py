"""The README's code that a reader copies runs as written."""

import re
from pathlib import Path

import fxreparam

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> str:
    text = README.read_text()
    section = text[text.index(title):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_writing_a_pass_example_runs():
    namespace: dict = {}
    try:
        exec(compile(_section_code("### Writing a pass"), "README.md", "exec"), namespace)
        namespace["test_neg_conv"]()
        names = [p.name for p in fxreparam.list_passes()]
        assert names.index("neg_conv") == names.index("conv_bn") + 1
    finally:
        fxreparam.unregister_pass("neg_conv")
