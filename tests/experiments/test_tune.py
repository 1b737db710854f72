"""`oncotransfer tune`: a nested search ends in an estimate, a naive figure and a final run; a killed tune resumes
without running its finished trials again; bad search keys and budgets are one line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from oncotransfer import cli  # noqa: E402
from oncotransfer.errors import ConfigError  # noqa: E402
from oncotransfer.rundir import run_finished  # noqa: E402
from oncotransfer.search_config import load_tune_config, parse_budget  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def tune_yaml(tmp: Path, trials: int = 3, **search) -> Path:
    """Frozen Lite0 on the 60 demo tiles at 64 px, features cached: each trial is two heads of a few epochs."""
    raw = {"name": "t", "output_dir": str(tmp / "runs"),
           "data": {"path": "demo:osteosarcoma", "image_size": 64},
           "split": {"kind": "holdout", "allow_image_level_split": True, "group_by_patient": False},
           "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
           "train": {"epochs": 2, "cache_dir": str(tmp / "cache"), "num_workers": 1, "feature_engine": "torch"},
           "evaluate": {"bootstrap": 100},
           "search": {"outer_folds": 2, "inner_folds": 2, "trials": trials,
                      "space": {"backbone": ["efficientnet_lite0"], "freeze": ["frozen", "pool:2"],
                                "image_size": [64], "views": [0], "epochs": [2, 3], "lr": [0.001, 0.01],
                                "schedule": ["constant"], "label_smoothing": [0.0], "head_width": [0, 16]},
                      **search}}
    path = tmp / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["oncotransfer", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_a_tiny_search_gives_nested_and_naive_figures_and_a_final_run(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "tune", str(tune_yaml(tmp_path)))
    assert code == 0, err
    lines = out.splitlines()
    nested = next(ln for ln in lines if ln.startswith("nested estimate: "))
    assert "(95% CI " in nested and 0 <= float(nested.split()[2]) <= 1
    assert any(ln.startswith("naive: the chosen model on its own inner folds (accuracy): ") for ln in lines)
    assert any(ln.startswith("model: trial") or ln.startswith("model: the mean of trials") for ln in lines)
    run = Path(next(ln for ln in lines if ln.startswith("run: "))[5:])
    assert run_finished(run) and (run / "checkpoint" / "model.safetensors").is_file()
    tune_dir = tmp_path / "runs" / "t-tune"
    assert (tune_dir / "recipe.yaml").is_file() and (tune_dir / "leaderboard.csv").is_file()
    assert any(ln == f"report: {tune_dir / 'report.html'}" for ln in lines)
    report = (tune_dir / "report.md").read_text()
    for needle in ("nested estimate (pooled held-out outer folds, 60 images)", "optimism (naive − nested)",
                   "## Chosen recipe", "model:", "![Optimisation history](plots/history.png)",
                   "## Parameter importances", "## Leaderboard (final search)", "CPU time"):
        assert needle in report, needle
    assert "data:image/png;base64," in (tune_dir / "report.html").read_text()
    assert "outer-0 trials: 3/3 done" in err and "best " in err  # progress on the terminal (plain lines here)
    storage = f"sqlite:///{tune_dir / 'study.db'}"
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"outer-0", "outer-1", "final"}
    for name in names:  # every search ran its trials; each trial reported per inner fold
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=DONE)
        assert len(trials) == 3 and all(t.intermediate_values for t in trials)
        # the config's own recipe first (epochs 2, head 100 -> the nearest width 16, lr 0.001), timed and estimated
        assert trials[0].params == {"freeze": "frozen", "epochs": 2, "head_width": 16, "lr": 0.001}
        assert all(t.user_attrs["seconds"] > 0 and t.user_attrs["estimate_s"] > 0 for t in trials)


def _done(storage: str, name: str) -> list:
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(states=DONE)
    except Exception:  # the study or its tables are not written yet
        return []


def test_a_killed_tune_resumes_without_repeating_finished_trials(tmp_path, monkeypatch, capsys):
    cfg = tune_yaml(tmp_path, trials=4)
    storage = f"sqlite:///{tmp_path / 'runs' / 't-tune' / 'study.db'}"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "oncotransfer.cli", "tune", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(_done(storage, "outer-0")) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {t.number: t.params for t in _done(storage, "outer-0")}
    assert 2 <= len(before) < 4, "the study finished before it could be killed; kill earlier"
    code, _, err = run_cli(monkeypatch, capsys, "tune", str(cfg))
    assert code == 0, err
    after = _done(storage, "outer-0")
    assert len(after) == 4  # the finished trials counted, only the missing ones were run
    assert {t.number: t.params for t in after if t.number in before} == before
    assert len({tuple(sorted(t.params.items())) for t in after}) == 4  # the resumed sampler drew new recipes


@pytest.mark.parametrize("search, needle", [
    ({"trails": 3}, "unknown key 'search.trails'"),
    ({"space": {"freeze": ["frozen", "half"]}}, "'search.space.freeze'"),
    ({"budget": "soon"}, "'search.budget'"),
])
def test_bad_search_keys_are_one_line_naming_the_key(tmp_path, search, needle):
    with pytest.raises(ConfigError) as e:
        load_tune_config(tune_yaml(tmp_path, **search))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("2h", 7200), ("90s", 90), ("900", 900), ("1.5h", 5400)])
def test_budgets_read_as_durations(text, seconds):
    assert parse_budget(text) == seconds


def test_a_bad_budget_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "tune", str(tune_yaml(tmp_path)), "--budget", "tomorrow")
    assert code == 2 and out == ""
    assert err.strip() == ("error: --budget: 'tomorrow' is not a duration; give e.g. 30m, 2h, 90s or 900 (seconds)")
    assert not (tmp_path / "runs").exists()


def test_a_trial_running_past_its_searchs_budget_stops_after_its_fold_once_another_finished():
    """Optuna's timeout only stops new trials; one slow recipe would overrun the budget by its whole length."""
    import time

    import optuna

    from oncotransfer.experiments.tune_trial import Inner, _past_deadline
    spent = Inner(None, None, None, [], Path("."), None, 4, deadline=time.monotonic() - 1)
    left = Inner(None, None, None, [], Path("."), None, 4, deadline=time.monotonic() + 3600)
    study = optuna.create_study()
    first = study.ask()
    assert not _past_deadline(spent, first, optuna)  # nothing finished yet: the search needs this answer
    study.tell(first, 0.5)
    second = study.ask()
    assert _past_deadline(spent, second, optuna) and not _past_deadline(left, second, optuna)
    assert not _past_deadline(Inner(None, None, None, [], Path("."), None, 4), second, optuna)


def test_the_base_recipe_is_projected_onto_the_space():
    from oncotransfer.experiments.tune_cost import base_params
    from oncotransfer.search_config import SearchSpace
    space = SearchSpace(freeze=["frozen", "last:1"], backbone=["efficientnet_lite0"], views=[0, 3],
                        epochs=[20, 40], lr=(1e-4, 1e-2), head_width=[0, 256])
    base = {"backbone": "efficientnet_lite0", "freeze": "pool:4", "image_size": 224, "views": 3, "epochs": 30,
            "lr": 0.05, "schedule": "constant", "label_smoothing": 0.0, "head_width": 100}
    got = base_params(None, space, base)
    # a choice the space lacks: the first (freeze), the nearest number (30 -> the cheaper 20 on a tie), the
    # range's edge for lr; fixed keys (backbone, image_size) are not searched, so not given
    assert got == {"freeze": "frozen", "views": 3, "epochs": 20, "schedule": "constant", "label_smoothing": 0.0,
                   "head_width": 0, "lr": 0.01}


def test_a_recipe_that_cannot_finish_in_the_time_left_is_skipped_before_it_trains():
    import time

    from oncotransfer.data.splits import Fold
    from oncotransfer.experiments.tune_cost import estimate_s
    from oncotransfer.experiments.tune_trial import Inner, _skip_if_too_slow
    import numpy as np
    folds = [Fold(i, np.arange(100), np.arange(0), np.arange(50)) for i in range(3)]
    cheap = {"backbone": "efficientnet_lite0", "freeze": "frozen", "image_size": 224, "views": 0, "epochs": 20}
    heavy = {**cheap, "backbone": "efficientnet_lite2", "freeze": "last:2", "views": 3, "epochs": 40}
    assert estimate_s(heavy, 100, 3) > 50 * estimate_s(cheap, 100, 3)
    inner = Inner(None, None, None, folds, Path("."), None, 9, deadline=time.monotonic() + 120)
    study = optuna.create_study()
    first = study.ask()
    _skip_if_too_slow(inner, first, heavy, optuna)  # nothing finished yet: the search needs an answer, it runs
    first.set_user_attr("seconds", 2 * first.user_attrs["estimate_s"])  # this machine: twice the estimate
    study.tell(first, 0.5)
    second = study.ask()
    _skip_if_too_slow(inner, second, cheap, optuna)  # a few seconds: fits
    third = study.ask()
    with pytest.raises(optuna.TrialPruned):
        _skip_if_too_slow(inner, third, heavy, optuna)
    assert third.user_attrs["skipped"].endswith("min left in this search")
    capped = Inner(None, None, None, folds, Path("."), None, 9, max_trial_s=1.0)
    fourth = study.ask()
    with pytest.raises(optuna.TrialPruned):
        _skip_if_too_slow(capped, fourth, cheap, optuna)  # about 2 x 2.1 s > 1 s
    assert "so that its final run fits" in fourth.user_attrs["skipped"]


def test_the_machine_factor_learns_from_trials_of_the_same_family():
    from types import SimpleNamespace

    from oncotransfer.experiments.tune_cost import machine_factor
    done = [SimpleNamespace(user_attrs={"seconds": s, "estimate_s": 10.0, "family": f})
            for s, f in ((4.0, "features"), (5.0, "features"), (30.0, "tail"))]
    assert machine_factor(done, "tail") == 3.0  # the cached-feature trials ran faster than estimated; tails did not
    assert machine_factor(done, "features") == 0.5
    assert machine_factor(done[:2], "tail") == 1.0  # no tail finished yet: the others can only make it slower
    slow = [SimpleNamespace(user_attrs={"seconds": 20.0, "estimate_s": 10.0, "family": "features"})]
    assert machine_factor(slow, "tail") == 2.0
    assert machine_factor([], "tail") == 1.0


def test_the_top_trials_are_averaged_when_their_mean_scores_better_on_the_inner_folds(tmp_path):
    from types import SimpleNamespace

    import numpy as np

    from oncotransfer.experiments.tune_ensemble import choose_members
    cfg, search = load_tune_config(tune_yaml(tmp_path))
    y = np.array([0, 1, 0, 1, 0, 1])
    data = SimpleNamespace(manifest=SimpleNamespace(labels=y, classes=["a", "b"]))
    inner = SimpleNamespace(base=cfg, search=search, data_for=lambda _cfg: data,
                            folds=[SimpleNamespace(test=np.arange(3)), SimpleNamespace(test=np.arange(3, 6))])
    study = optuna.create_study(direction="maximize")
    size = optuna.distributions.CategoricalDistribution([64, 128])
    for value, p_b, image_size in [(0.9, [.1, .9, .1, .9, .6, .4], 64),   # best: rows 4 and 5 wrong
                                   (0.8, [.4, .6, .4, .6, .1, .9], 64),   # with the best: every row right
                                   (0.75, [.4, .6, .4, .6, .1, .9], 128),  # another input: never a member
                                   (0.7, [.9, .1, .9, .1, .9, .1], 64)]:  # a third member spoils row 5
        oof = [[1 - p, p] for p in p_b]
        study.add_trial(optuna.trial.create_trial(params={"image_size": image_size}, distributions={"image_size": size},
                                                  value=value, user_attrs={"oof": oof}))
    members, tried = choose_members(study, inner, 3, optuna)
    assert [t.number for t in members] == [0, 1]
    assert [(r["members"], r["trials"], round(r["score"], 3)) for r in tried] == [
        (1, [0], 0.667), (2, [0, 1], 1.0), (3, [0, 1, 3], 0.667)]
    assert [t.number for t in choose_members(study, inner, 1, optuna)[0]] == [0]  # ensemble: 1 -> the best alone


def test_an_ensemble_of_top_trials_becomes_the_final_run(tmp_path, monkeypatch, capsys):
    """The plumbing, whatever the inner folds say: each outer fold refits both members, each member is trained as
    a run of its own in members/, and final/ is their merge, a run predict loads with every recipe's folds."""
    from oncotransfer.experiments import tune as tune_module
    from oncotransfer.infer.predict import Predictor

    def top_two(study, inner, cap, optuna):
        done = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                      key=lambda t: (-t.value, t.number))[:2]
        return done, [{"members": 1, "trials": [done[0].number], "score": done[0].value},
                      {"members": 2, "trials": [t.number for t in done], "score": 0.5}]
    monkeypatch.setattr(tune_module, "choose_members", top_two)
    code, out, err = run_cli(monkeypatch, capsys, "tune", str(tune_yaml(tmp_path)), "--json")
    assert code == 0, err
    summary = __import__("json").loads(out)
    members = [m["trial"] for m in summary["ensemble"]["members"]]
    assert len(members) == 2 and summary["naive"]["value"] == 0.5
    tune_dir = tmp_path / "runs" / "t-tune"
    assert all(run_finished(tune_dir / "members" / f"trial{n}") for n in members)
    final = Path(summary["run"])
    assert run_finished(final) and (final / "checkpoint" / "recipes" / "1" / "meta.json").is_file()
    assert all(len(p["members"]) == 2 for p in summary["nested"]["per_fold"])  # each outer fold refits both
    pred = Predictor.from_run(final, "torch")
    assert "2 recipes" in pred.describe()
    assert "The final model is the mean of 2 trials' runs" in (tune_dir / "report.md").read_text()


def test_an_ensemble_gets_only_the_members_the_time_left_can_train(tmp_path):
    from types import SimpleNamespace

    from oncotransfer.experiments.tune_cost import estimate_s
    from oncotransfer.experiments.tune_ensemble import affordable
    from oncotransfer.experiments.tune_space import defaults
    cfg, search = load_tune_config(tune_yaml(tmp_path))
    inner = SimpleNamespace(base=cfg)
    study = optuna.create_study(direction="maximize")
    epochs = optuna.distributions.CategoricalDistribution([2, 3])
    for value, n_epochs in [(0.9, 2), (0.8, 3), (0.7, 2)]:
        p = {**defaults(cfg), "epochs": n_epochs}
        study.add_trial(optuna.trial.create_trial(  # ran exactly as estimated: a machine factor of 1
            params={"epochs": n_epochs}, distributions={"epochs": epochs}, value=value,
            user_attrs={"seconds": estimate_s(p, 100, 3), "estimate_s": estimate_s(p, 100, 3), "family": "features"}))
    fits = [(1000, 5), (600, 3)]
    cost = [sum(estimate_s({**defaults(cfg), "epochs": e}, r, k) for r, k in fits) for e in (2, 3, 2)]
    assert affordable(study, inner, 3, None, fits, optuna) == 3  # no budget: the cap
    assert affordable(study, inner, 3, sum(cost) / 0.8 + 1, fits, optuna) == 3
    assert affordable(study, inner, 3, (cost[0] + cost[1]) / 0.8 + 1, fits, optuna) == 2
    assert affordable(study, inner, 3, 1.0, fits, optuna) == 1  # the best trial always
