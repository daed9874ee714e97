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


def figure_of(metrics: dict[str, Any]) -> float | None:
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
                 targets: dict[str, dict[str, Any]] | None = None, started_from: str | None = None) -> list[str]:
    """The card's Target section for model ``name`` with test figures ``tests``; [] when its task has none.

    ``started_from``: the name of the model the run was warm-started from (its record's ``warm_start``).
    Figures are compared as the card prints them, to 3 decimals.
    """
    from napari_sdunet.models import get_arch

    t = (targets or load_targets()).get(task)
    if not t:
        return []
    base_arch = get_arch(arch).baseline
    goal = t.get("sd") if base_arch else t.get("baseline")
    got = figure_of(tests.get(t["test"], {}))
    got = None if got is None else round(got, 3)
    lines = [HEADING]
    if goal is None:
        other = f"; the SD networks' is {t['what']} ≥ {t['sd']:.2f}" if t.get("sd") is not None else ""
        lines.append(f"- no target for the baselines on {task}{other}")
    elif got is None:
        lines.append(f"- target: {t['what']} ≥ {goal:.2f}; this model's test figure is not recorded")
    else:
        verdict = "**reached**" if got >= goal else f"**missed** by {goal - got:.3f}"
        lines.append(f"- target: {t['what']} ≥ {goal:.2f}; this model: {got:.3f}, {verdict}")
    if base_arch:
        base_name = f"{base_arch}-{task}"
        base_cfg = weights / base_name / "config.json"
        base = None
        if base_cfg.is_file():
            base = figure_of(card_tests(json.loads(base_cfg.read_text())).get(t["test"], {}))
        role = " (the weights it started from)" if started_from == base_name else ""
        if base is None:
            lines.append(f"- its baseline `{base_name}` has no shipped test figure to compare with")
        elif got is not None:
            base = round(base, 3)
            rel = "at least matches" if got >= base else "stays below"
            lines.append(f"- the SD network {rel} its baseline `{base_name}`{role}: {got:.3f} vs {base:.3f}")
    if goal is None or got is None or got < goal:
        lines.append(f"- what limits it (measured; see the learning curve above and `training/CAMPAIGN.md`): "
                     f"{' '.join(t['limits'].split())}")
    return lines


def _sections(lines: list[str]) -> list[tuple[int, str]]:
    """(line index, heading) of the card's level-2 headings, outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            out.append((i, line.strip()))
    return out


def with_target(card: str, lines: list[str]) -> str:
    """``card`` with its Target section replaced by ``lines``: inserted before Provenance, or at the end when the
    card has none; every other line stays as it was."""
    rows = card.splitlines(keepends=True)
    heads = _sections(rows)
    for k, (i, head) in enumerate(heads):
        if head == HEADING or head.startswith(HEADING + " ") or head.startswith(HEADING + "("):
            stop = heads[k + 1][0] if k + 1 < len(heads) else len(rows)
            del rows[i:stop]
            break
    if not lines:
        return "".join(rows)
    if rows and not rows[-1].endswith("\n"):
        rows[-1] += "\n"
    at = next((i for i, head in _sections(rows) if head.startswith("## Provenance")), len(rows))
    block = [ln + "\n" for ln in lines] + ["\n"]
    if at == len(rows) and rows and rows[-1].strip():
        block = ["\n", *block]
    rows[at:at] = block
    return "".join(rows)


def warm_start_name(rec: dict[str, Any]) -> str | None:
    """The name of the model a campaign run started from (its record's ``warm_start``)."""
    from .campaign import portable_warm_start

    warm = portable_warm_start(rec.get("warm_start"))
    return warm.get("model") if warm else None


def refresh_cards(weights: Path, names: list[str] | None = None) -> list[Path]:
    """Rewrite the Target section of shipped campaign models' cards (all, or those in ``names`` when given);
    returns the cards rewritten."""
    from napari_sdunet.io import atomic_path

    targets = load_targets()
    done = []
    for folder in sorted(p for p in weights.iterdir() if (p / "config.json").is_file()):
        if names is not None and folder.name not in names:
            continue
        cfg = json.loads((folder / "config.json").read_text())
        rec = cfg.get("campaign")
        card = folder / "README.md"
        if not rec or not card.is_file():
            continue
        lines = target_lines(folder.name, rec["arch"], rec["task"], card_tests(cfg), weights, targets,
                             started_from=warm_start_name(rec))
        text = with_target(card.read_text(), lines)
        with atomic_path(card) as tmp:
            tmp.write_text(text)
        done.append(card)
    return done
