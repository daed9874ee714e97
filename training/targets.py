"""The accuracy targets of the campaign's models (``training/targets.toml``) in each model card.

A card says which target applies to its model, whether its test Dice reaches it, how it compares with the
baseline it was warm-started from, and, where the target is missed, what the campaign measured about what
limits the task. ``refresh_cards`` rewrites that section of the shipped cards from their own recorded test
figures: nothing is trained or measured again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, as in campaign.py
    import tomli as tomllib  # type: ignore[no-redef]

TARGETS_FILE = Path(__file__).with_name("targets.toml")
HEADING = "## Target"


def load_targets(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The targets per task (see targets.toml)."""
    return tomllib.loads(Path(path or TARGETS_FILE).read_text())


def test_dice(metrics: dict[str, Any]) -> float | None:
    """The test figure a target is about: per-image Dice, or per-volume 3-D Dice for CT."""
    value = metrics.get("dice_3d", metrics.get("dice"))
    return None if value is None else float(value)


def card_tests(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The test figures a shipped model's config.json records, by protocol (native, nuclei_96, preset)."""
    primary = config.get("metrics") or {}
    tests = {primary.get("protocol", "preset"): primary} if primary else {}
    tests.update(config.get("metrics_other") or {})
    return tests


def target_lines(name: str, arch: str, task: str, tests: dict[str, dict[str, Any]], weights: Path,
                 targets: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The card's Target section for model ``name`` with test figures ``tests``; [] when its task has none."""
    from napari_sdunet.models import get_arch

    t = (targets or load_targets()).get(task)
    if not t:
        return []
    base_arch = get_arch(arch).baseline
    goal = t.get("sd") if base_arch else t.get("baseline")
    got = test_dice(tests.get(t["test"], {}))
    lines = [HEADING]
    if goal is None:
        lines.append(f"- no target for the baselines on {task}; the SD networks' is {t['what']} ≥ {t['sd']:.2f}")
    elif got is None:
        lines.append(f"- target: {t['what']} ≥ {goal:.2f}; not measured for this model")
    else:
        verdict = "**reached**" if got >= goal else f"**missed** by {goal - got:.3f}"
        lines.append(f"- target: {t['what']} ≥ {goal:.2f}; this model: {got:.3f}, {verdict}")
    if base_arch:
        base_cfg = weights / f"{base_arch}-{task}" / "config.json"
        base = None
        if base_cfg.is_file():
            base = test_dice(card_tests(json.loads(base_cfg.read_text())).get(t["test"], {}))
        if base is None or got is None:
            lines.append(f"- its baseline `{base_arch}-{task}` is not shipped, so there is nothing to compare with")
        else:
            rel = "at least matches" if got >= base else "stays below"
            lines.append(f"- the SD network {rel} its baseline `{base_arch}-{task}` (the weights it started from): "
                         f"{got:.3f} vs {base:.3f}")
    if goal is None or got is None or got < goal:
        lines.append(f"- what limits it (measured; see the learning curve above and `training/CAMPAIGN.md`): "
                     f"{' '.join(t['limits'].split())}")
    return lines


def with_target(card: str, lines: list[str]) -> str:
    """``card`` with its Target section replaced by ``lines`` (inserted before Provenance if it had none)."""
    parts = card.split("\n## ")
    head, sections = parts[0], ["## " + p for p in parts[1:]]
    sections = [s for s in sections if not s.startswith(HEADING + "\n")]
    if lines:
        new = "\n".join(lines) + "\n"
        at = next((i for i, s in enumerate(sections) if s.startswith("## Provenance")), len(sections))
        sections.insert(at, new)
    return "\n".join([head.rstrip("\n") + "\n", *(s.rstrip("\n") + "\n" for s in sections)])


def refresh_cards(weights: Path, names: list[str] | None = None) -> list[Path]:
    """Rewrite the Target section of shipped campaign models' cards (all, or ``names``); returns the cards."""
    from napari_sdunet.io import atomic_path

    targets = load_targets()
    done = []
    for folder in sorted(p for p in weights.iterdir() if (p / "config.json").is_file()):
        if names and folder.name not in names:
            continue
        cfg = json.loads((folder / "config.json").read_text())
        rec = cfg.get("campaign")
        card = folder / "README.md"
        if not rec or not card.is_file():
            continue
        text = with_target(card.read_text(), target_lines(folder.name, rec["arch"], rec["task"], card_tests(cfg),
                                                          weights, targets))
        with atomic_path(card) as tmp:
            tmp.write_text(text)
        done.append(card)
    return done
