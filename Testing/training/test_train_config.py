"""The train-teacher / distill options are generated from TrainConfig: each option written once, every field
reachable from the command line, old spellings still accepted."""
from __future__ import annotations

import argparse
import re
from dataclasses import fields

import pytest

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.training.config import TrainConfig, add_options, cli_fields, config_from_args, flag_of

# set by the program, never by the user
PROGRAM_FIELDS = {"role", "command_line", "extra_card", "warmup", "grad_clip", "ckpt_minutes"}


def _parser(role):
    p = argparse.ArgumentParser(prog="kdseg", formatter_class=lambda prog: argparse.HelpFormatter(prog, width=200))
    add_options(p, role)
    return p


def _help_flags(text):
    """The flags listed in the options part of a --help text (one per line, usage line and help texts left out)."""
    options = text.split("\noptions:\n" if "\noptions:\n" in text else "\noptional arguments:\n", 1)[1]
    return re.findall(r"^\s{2}(?:-h, )?(--[a-z][a-z0-9-]*)", options, flags=re.M)


def test_every_option_field_appears_once_in_distill_help():
    from KDSegmentationLib.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["distill"].format_help()
    flags = _help_flags(text)
    option_fields = {f.name for f, _ in cli_fields()}
    assert option_fields == {f.name for f in fields(TrainConfig)} - PROGRAM_FIELDS
    for f, opt in cli_fields():
        assert flags.count(flag_of(f, opt)) == 1, flag_of(f, opt)
    assert "--unlabeled" not in flags and "--unlabeled-fraction" not in flags  # hidden aliases
    assert "--unlabelled" in flags and "--no-amp" in flags and "--cache" in flags


def test_teacher_options_are_the_shared_ones():
    flags = set(_help_flags(_parser("teacher").format_help()))
    for name in ("--teacher", "--alpha", "--temperature", "--unlabelled", "--init"):
        assert name not in flags
    assert {"--losses", "--soft-labels", "--data", "--output", "--max-minutes"} <= flags


def test_parsed_options_become_the_config():
    args = _parser("student").parse_args(
        ["--task", "retina", "--teacher", "t.kdseg.pt", "--data", "D", "--patch", "64x48", "--arch-args",
         '{"width": 8}', "--no-amp", "--no-augment", "--cache", "C", "--version", "v7", "--log-every", "0",
         "--unlabeled", "U", "--unlabeled-fraction", "0.25"])
    cfg = config_from_args(args)
    assert cfg.role == "student" and cfg.task == "retina" and cfg.teacher == "t.kdseg.pt"
    assert cfg.patch == [64, 48] and cfg.arch_args == {"width": 8} and cfg.amp is False and cfg.augment is False
    assert cfg.cache_dir == "C" and cfg.version == "v7" and cfg.log_every == 1
    assert cfg.unlabelled == "U" and cfg.unlabelled_fraction == 0.25
    assert cfg.progress == "auto" and cfg.device == "auto" and cfg.weight_decay == 1e-4
    assert cfg.command_line.startswith("kdseg ")
    same = config_from_args(_parser("student").parse_args(
        ["--task", "retina", "--teacher", "t.kdseg.pt", "--unlabelled", "U", "--unlabelled-fraction", "0.25"]))
    assert same.unlabelled == "U" and same.unlabelled_fraction == 0.25


def test_teacher_config_keeps_the_field_defaults():
    cfg = config_from_args(_parser("teacher").parse_args(["--task", "liver", "--data", "D", "--output", "o"]))
    defaults = TrainConfig(task="liver")
    assert cfg.role == "teacher" and cfg.teacher is None and cfg.unlabelled is None
    assert (cfg.alpha, cfg.temperature, cfg.unlabelled_fraction) == (defaults.alpha, defaults.temperature,
                                                                    defaults.unlabelled_fraction)


@pytest.mark.parametrize("argv, message", [
    (["--task", "retina", "--data", "D"], "needs --teacher"),
    (["--task", "retina", "--teacher", "t", "--data", "D", "--unlabelled-fraction", "1"], "between 0 and 1"),
    (["--task", "retina", "--teacher", "t"], "--unlabelled DIR"),
    (["--task", "retina", "--teacher", "t", "--data", "D", "--patch", "a,b"], "--patch"),
    (["--task", "retina", "--teacher", "t", "--data", "D", "--arch-args", "[1]"], "JSON object"),
])
def test_bad_combinations_are_input_errors(argv, message):
    with pytest.raises(InputError, match=re.escape(message)):
        config_from_args(_parser("student").parse_args(argv))


def test_a_student_started_from_a_trained_one_is_fine_tuned_at_a_lower_rate():
    from KDSegmentationLib.tasks import get_task
    from KDSegmentationLib.training.config import TrainConfig
    from KDSegmentationLib.training.plan import make_plan

    task = get_task("retina")
    lr = lambda **kw: make_plan(TrainConfig(task="retina", steps=10, **kw), task, 4, 0, False, 1).lr  # noqa: E731
    assert lr() == 2e-3 and lr(init="s.kdseg.pt") == 5e-4 and lr(role="teacher") == 1e-3
    assert lr(init="s.kdseg.pt", lr=1e-2) == 1e-2


def test_a_time_budget_ends_the_warm_up_after_its_share_of_the_run():
    """Under a time budget only a fraction of the planned steps may fit: the warm-up must still end after 3 % of
    the run, not after 3 % of the planned steps (which was 40 % of a 3D teacher's real run)."""
    from KDSegmentationLib.tasks import get_task
    from KDSegmentationLib.training.plan import lr_factor, make_plan

    task = get_task("liver")
    plan = make_plan(TrainConfig(task="liver", max_minutes=20), task, 6, 0, False, 1)
    assert plan.warmup_steps > 100 and plan.warmup_fraction == pytest.approx(0.03)
    at = lambda step, seconds: lr_factor(step, plan.fraction_done(step, seconds), plan.warmup_steps,  # noqa: E731
                                         "cosine", warmup_fraction=plan.warmup_fraction)
    assert at(0, 0.0) == pytest.approx(1 / plan.warmup_steps)
    assert at(10, 0.015 * plan.budget_s) == pytest.approx(0.5, abs=0.01)   # half-way through the warm-up by time
    assert at(20, 0.05 * plan.budget_s) > 0.97                             # warmed up long before step 216
    assert at(20, 0.5 * plan.budget_s) == pytest.approx(0.505, abs=0.01)   # then the cosine follows the time
    # without a time budget the warm-up is counted in steps, as before
    steps = make_plan(TrainConfig(task="liver", steps=1000), task, 6, 0, False, 1)
    assert steps.warmup_steps == 30
    assert lr_factor(14, steps.fraction_done(14, 1e9), 30, "cosine", warmup_fraction=0.03) == pytest.approx(0.5)
