"""README.md's Python example runs as written."""
import re

from conftest import REPO


def test_readme_python_example():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no ```python block"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["loss"].dim() == 0 and namespace["x"].grad is not None
