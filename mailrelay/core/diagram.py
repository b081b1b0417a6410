"""
The session state machine drawn from its table (`core.machine.TRANSITIONS`), as the
Mermaid diagram in `docs/session-states.md`:

    python -m mailrelay.core.diagram > docs/session-states.md

`tests/test_core_machine.py` fails when the document and the table differ.
"""

from __future__ import annotations

from .machine import LIVE, MEANING, TRANSITIONS, Input, State


def mermaid() -> str:
    """The machine as a Mermaid state diagram (what `docs/session-states.md` shows)."""
    names = {state: state.name.lower() for state in State}
    lines = ["stateDiagram-v2"]
    lines += [f"    {names[s]}: {s.value}" for s in State]
    lines.append(f"    [*] --> {names[State.ACCEPTED]}")
    # Close and lost lead from (nearly) everywhere: drawn once each, as notes would be.
    common = {Input.CLOSE, Input.LOST}
    for (before, event), after in TRANSITIONS.items():
        if event not in common:
            lines.append(f"    {names[before]} --> {names[after]}: {event.value}")
    lines.append(f"    {names[State.DRAINING]} --> {names[State.CLOSED]}: lost")
    lines.append(f"    {names[State.CLOSED]} --> [*]")
    return "\n".join(lines) + "\n"


def document() -> str:
    """The text of `docs/session-states.md`."""
    live = ", ".join(s.value for s in LIVE)
    return (
        "# A session's states\n\n"
        "Generated from `mailrelay/core/machine.py` by `python -m mailrelay.core.diagram`;\n"
        "`tests/test_core_machine.py` fails when this file and the code differ.\n\n"
        "```mermaid\n" + mermaid() + "```\n\n"
        f"Not drawn, to keep the diagram readable: `close` leads to draining from every live state ({live}),\n"
        "and `lost` (the client connection is gone) leads to closed from every state but closed.\n\n"
        "| State | Meaning |\n|---|---|\n" + "".join(f"| {s.value} | {MEANING[s]} |\n" for s in State)
    )


if __name__ == "__main__":
    print(document(), end="")
