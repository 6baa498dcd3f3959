"""docs/trl.md's key-name tables are generated from posttrain.trl_names; this test keeps them current.

Regenerate with `python tests/usability/test_trl_doc.py`."""

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "trl.md"


def tables() -> dict[str, str]:
    """The generated markdown of each marked section."""
    from posttrain.cli import COMMANDS, _load_command
    from posttrain.config import key_aliases
    from posttrain.trl_names import NOT_EQUIVALENT

    rows = ["| command | also accepted → key |", "|---|---|"]
    for command in COMMANDS:
        cls, _ = _load_command(command)
        aliases = key_aliases(cls)
        if aliases:
            rows.append(f"| {command} | " + ", ".join(f"`{a}` → `{k}`" for a, k in sorted(aliases.items())) + " |")
    not_eq = ["| TRL name | here |", "|---|---|"] + [f"| `{k}` | {v} |" for k, v in NOT_EQUIVALENT.items()]
    return {"aliases": "\n".join(rows), "not-equivalent": "\n".join(not_eq)}


def render(text: str) -> str:
    """`text` with every marked section replaced by its generated table."""
    for name, table in tables().items():
        text = re.sub(rf"<!-- {name}:start -->.*?<!-- {name}:end -->",
                      f"<!-- {name}:start -->\n{table}\n<!-- {name}:end -->", text, flags=re.DOTALL)
    return text


def test_doc_tables_are_current():
    text = DOC.read_text()
    assert render(text) == text, "docs/trl.md is stale: run `python tests/usability/test_trl_doc.py`"
    assert "`learning_rate` → `lr`" in text and "`beta` → `kl_coef`" in text


if __name__ == "__main__":
    sys.path.insert(0, str(DOC.parents[1] / "src"))
    DOC.write_text(render(DOC.read_text()))
    print(f"wrote {DOC}")
