"""Model cards state the issue's accuracy target, the verdict, the baseline comparison and what limits it."""

import json

import pytest

from training.targets import card_tests, load_targets, refresh_cards, target_lines, with_target

TARGETS = {"nuclei": {"test": "native", "what": "Dice on nuclei/", "sd": 0.93, "baseline": 0.90,
                      "limits": "the labels   of DSB2018"},
           "polyps": {"test": "preset", "what": "Dice on CVC", "sd": 0.80, "limits": "other sequences"}}


CARD = "# m\n\n## Test metrics\n- x\n\n## Provenance\n- y\n"


def _model(weights, name, arch, task, dice, protocol="native", card=CARD):
    folder = weights / name
    folder.mkdir(parents=True)
    cfg = {"campaign": {"arch": arch, "task": task}, "metrics": {"protocol": protocol, "dice": dice},
           "metrics_other": {"nuclei_96": {"dice": 0.5}}}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "README.md").write_text(card)
    return folder


def test_targets_file_covers_every_task_with_a_test_figure_and_limits():
    t = load_targets()
    assert set(t) == {"nuclei", "polyps", "liver"}
    for task in t.values():
        assert task["test"] in ("native", "preset") and task["sd"] > 0.5 and len(task["limits"]) > 100


def test_missed_target_says_by_how_much_compares_with_the_baseline_and_says_what_limits_it(tmp_path):
    _model(tmp_path, "unetpp-nuclei", "unetpp", "nuclei", 0.897)
    tests = {"native": {"dice": 0.893}, "nuclei_96": {"dice": 0.84}}
    lines = target_lines("sdnunet-nuclei", "sdnunet", "nuclei", tests, tmp_path, TARGETS,
                         started_from="unetpp-nuclei")
    text = "\n".join(lines)
    assert "`unetpp-nuclei` (the weights it started from)" in text
    other = "\n".join(target_lines("sdnunet-nuclei", "sdnunet", "nuclei", tests, tmp_path, TARGETS))
    assert "started from" not in other  # not said unless the record says so
    assert lines[0] == "## Target"
    assert "≥ 0.93; this model: 0.893, **missed** by 0.037" in text
    assert "stays below its baseline `unetpp-nuclei`" in text and "0.893 vs 0.897" in text
    assert "what limits it" in text and "the labels of DSB2018" in text  # whitespace folded


def test_reached_target_has_no_limits_line_and_baselines_use_their_own_target(tmp_path):
    lines = target_lines("unet-nuclei", "unet", "nuclei", {"native": {"dice": 0.91}}, tmp_path, TARGETS)
    assert "≥ 0.90; this model: 0.910, **reached**" in lines[1]
    assert not any("limits" in ln for ln in lines) and not any("baseline `" in ln for ln in lines)
    lines = target_lines("unet-polyps", "unet", "polyps", {"preset": {"dice": 0.6}}, tmp_path, TARGETS)
    assert "no target for the baselines on polyps" in lines[1] and "other sequences" in lines[-1]
    lines = target_lines("sdunet-polyps", "sdunet", "polyps", {"preset": {"dice": 0.6}}, tmp_path, TARGETS)
    assert any("`unet-polyps` has no shipped test figure" in ln for ln in lines)
    # compared as printed: 0.89996 is 0.900, which reaches 0.90
    assert "**reached**" in target_lines("u", "unet", "nuclei", {"native": {"dice": 0.89996}}, tmp_path, TARGETS)[1]
    assert "not recorded" in target_lines("u", "unet", "nuclei", {}, tmp_path, TARGETS)[1]
    assert target_lines("x", "unet", "kidney", {}, tmp_path, TARGETS) == []


def test_liver_target_is_about_the_per_volume_dice():
    assert card_tests({"metrics": {"protocol": "preset", "dice_3d": 0.87}})["preset"]["dice_3d"] == 0.87
    from training.targets import figure_of

    assert figure_of({"dice_3d": 0.87, "dice": 0.7}) == pytest.approx(0.87)


def test_with_target_inserts_before_provenance_and_replaces_an_old_section():
    card = "# m\n\nintro\n\n## Test metrics\n- a\n\n## Provenance\n- p\n"
    once = with_target(card, ["## Target", "- t1"])
    assert once.index("## Target") < once.index("## Provenance") and "- t1" in once
    twice = with_target(once, ["## Target", "- t2"])
    assert twice.count("## Target") == 1 and "- t2" in twice and "- t1" not in twice
    assert with_target(twice, []) == with_target(card, [])
    assert "intro" in twice and "- a\n" in twice and twice.endswith("- p\n")


def test_refresh_cards_rewrites_only_campaign_models(tmp_path):
    a = _model(tmp_path, "sdunet-nuclei", "sdunet", "nuclei", 0.898)
    _model(tmp_path, "unet-nuclei", "unet", "nuclei", 0.8978)
    other = tmp_path / "user-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"task": "nuclei"}))
    (other / "README.md").write_text("# mine\n")
    cards = refresh_cards(tmp_path)
    assert sorted(c.parent.name for c in cards) == ["sdunet-nuclei", "unet-nuclei"]
    text = (a / "README.md").read_text()
    assert "## Target" in text and "0.898 vs 0.898" in text and "at least matches" in text
    assert (other / "README.md").read_text() == "# mine\n"
    assert refresh_cards(tmp_path, ["unet-nuclei"])[0].parent.name == "unet-nuclei"


def test_every_shipped_campaign_card_has_its_current_target_section():
    # stale after targets.toml or a baseline's figures changed: `python -m training campaign cards ...`
    from napari_sdunet.zoo import PACKAGE_WEIGHTS
    from training.targets import warm_start_name

    for cfg_file in PACKAGE_WEIGHTS.glob("*/config.json"):
        cfg = json.loads(cfg_file.read_text())
        rec = cfg.get("campaign")
        if rec:
            card = (cfg_file.parent / "README.md").read_text()
            want = target_lines(cfg_file.parent.name, rec["arch"], rec["task"], card_tests(cfg), PACKAGE_WEIGHTS,
                                started_from=warm_start_name(rec))
            assert "\n".join(want) + "\n" in card, cfg_file.parent.name


@pytest.mark.parametrize("card", [
    "## Target\n- old\n\n## Provenance\n- p\n",                 # no title line
    "# m\r\n\r\n## Target\r\n- old\r\n\r\n## Provenance\r\n- p\r\n",  # CRLF
    "# m\n\n## Target (issue 12)\n- old\n\n## Provenance\n- p\n",  # a variant of the heading
    "# m\n\n## Provenance\n- p\n\n## Target",                      # at the end, no newline
])
def test_with_target_replaces_the_old_section_in_any_card(card):
    out = with_target(card, ["## Target", "- new"])
    assert out.count("## Target") == 1 and "- new" in out and "- old" not in out and "- p" in out
    assert with_target(out, ["## Target", "- new"]) == out  # idempotent


def test_with_target_leaves_code_blocks_and_cards_without_provenance_alone():
    card = "# m\n\n```\n## Provenance (a comment)\n## Target in code\n```\n\n## Test metrics\n- a\n"
    out = with_target(card, ["## Target", "- t"])
    assert out.startswith(card) and out.endswith("\n## Target\n- t\n\n")  # appended after everything
    assert with_target(out, []) .rstrip("\n") == card.rstrip("\n")
