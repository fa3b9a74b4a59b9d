"""The action table (flight_server/transport/actions.py) against what users read: every action has a documented
`FeatureClient` method and a section in docs/protocol.md, and the client sends no action the server lacks.

The client may not import the server's transport layer, so the cross-check lives here.
"""

from __future__ import annotations

import ast
import pathlib
import re

from flight_server.transport.actions import ACTIONS
from flight_server.transport.auth import PERMISSIONS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def client_methods() -> dict[str, ast.FunctionDef]:
    """Each action `FeatureClient` sends (`self._action("name", ...)`), with the method that sends it."""
    tree = ast.parse((ROOT / "flight_client" / "client.py").read_text())
    client = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FeatureClient")
    found: dict[str, ast.FunctionDef] = {}
    for method in client.body:
        if not isinstance(method, ast.FunctionDef):
            continue
        for node in ast.walk(method):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "_action"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found[node.args[0].value] = method
    return found


def documented_actions() -> set[str]:
    """The action names in the headings of the Actions part of docs/protocol.md."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    part = text.split("\n## Actions", 1)[1].split("\n## ", 1)[0]
    headings = [line for line in part.splitlines() if line.startswith("### ")]
    return {name for heading in headings for name in re.findall(r"`([a-z_]+)`", heading)}


def test_every_action_has_a_documented_client_method() -> None:
    methods = client_methods()
    missing = sorted(set(ACTIONS) - set(methods))
    assert not missing, f"FeatureClient has no method for the action(s) {missing}"
    undocumented = sorted(name for name in ACTIONS if not ast.get_docstring(methods[name]))
    assert not undocumented, f"the FeatureClient methods of {undocumented} have no docstring"


def test_the_client_sends_only_actions_the_server_has() -> None:
    assert sorted(set(client_methods()) - set(ACTIONS)) == []


def test_every_action_has_a_section_in_the_protocol() -> None:
    documented = documented_actions()
    assert sorted(set(ACTIONS) - documented) == [], "docs/protocol.md: add a '### ...' section naming each action"
    assert sorted(documented - set(ACTIONS)) == [], "docs/protocol.md documents actions the server does not have"


def test_every_action_row_is_complete() -> None:
    for name, action in ACTIONS.items():
        assert action.name == name
        assert action.doc.strip() and "Body:" in action.doc, name
        assert action.permission in PERMISSIONS, name
