"""The README stays true: every setting is in its configuration table, and the files it
links to exist."""

from __future__ import annotations

import re

from convoy.settings import Settings
from tests.services import ROOT

README = (ROOT / "README.md").read_text()


def test_configuration_table_lists_every_setting():
    documented = set(re.findall(r"^\| `(CONVOY_[A-Z0-9_]+)` \|", README, re.MULTILINE))
    fields = {f"CONVOY_{name.upper()}" for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from README's table"
    assert documented - fields == set(), "README documents settings that do not exist"


def test_two_commands_and_local_links():
    assert "make run" in README and "make test" in README
    targets = {t for t in re.findall(r"\]\(([^)#]+)\)", README)
               if not t.startswith(("http", "../"))}
    assert {"docs/reliability.md", "docs/security.md", "bench/RESULTS.md"} <= targets
    assert sorted(t for t in targets if not (ROOT / t).exists()) == [], "dead links"
