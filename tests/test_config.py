"""Flag parsing and validation (no network, nothing started)."""
import dataclasses
import os
import subprocess
import sys

import pytest

from config_setup import ConfigError, RunConfig, mini_batches_per_round, parse_config
from conftest import ROOT


def test_reference_short_flags_and_long_aliases_agree():
    short = parse_config(["-sd", "7", "--np", "16", "--gs", "4", "--gk", "2", "--ni", "2", "--iv", "3", "--wandb",
                          "disabled"])
    long = parse_config(["--seed", "7", "--num-peers", "16", "--group-size", "4", "--group-key-dim", "2",
                         "--mar-steps", "2", "--iteration-value", "3", "--wandb", "disabled"])
    assert short == long
    assert (short.seed, short.num_peers, short.group_size, short.mar_steps) == (7, 16, 4, 2)
    assert parse_config(["--sd", "9", "--wandb", "disabled"]).seed == 9


def test_config_is_frozen():
    cfg = parse_config(["--wandb", "disabled"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--np", "0"], "--np"),
        (["--gs", "1"], "--gs"),
        (["--up", "0"], "--up"),
        (["--ap", "150"], "--ap"),
        (["--dl", "100"], "--dl"),
        (["--mm", "1.0"], "--mm"),
        (["--lr", "-1"], "--lr"),
        (["--sp", "weird"], "--sp"),
        (["--im", "2"], "--im"),
        (["--peer-range", "3-99"], "--peer-range"),
        (["--nb"], "--kd"),
        (["--compression", "zip"], "--compression"),
        (["--np", "x"], "--np"),
    ],
)
def test_invalid_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as err:
        parse_config(argv + ["--wandb", "disabled"])
    assert flag in str(err.value)


def test_values_are_never_rewritten():
    cfg = parse_config(["--np", "16", "--up", "50", "--ap", "80", "--wandb", "disabled"])
    assert (cfg.update_percent, cfg.aggregate_percent) == (50, 80)


def test_mini_batches_per_round():
    assert mini_batches_per_round(RunConfig(iteration_mode="batches", iteration_value=4), num_samples=60000) == 4
    # passes: 60000 / 8 peers / 64 = 118 batches per partition, seen once every 10 rounds -> 12 per round
    cfg = RunConfig(iteration_mode="passes", iteration_value=10, num_peers=8, batch_size=64)
    assert mini_batches_per_round(cfg, num_samples=60000) == 12


def test_peer_range_is_inclusive():
    cfg = parse_config(["--np", "8", "--peer-range", "2-5", "--wandb", "disabled"])
    assert list(cfg.local_peers()) == [2, 3, 4, 5]


def test_cli_error_is_one_line_exit_2_and_starts_nothing(tmp_path, no_new_p2pd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mar_fl.py"), "--gs", "1", "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--gs" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mar_fl.py"), "--data-dir", str(tmp_path),
                           "--wandb", "disabled"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MARFL_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "MNIST not found" in proc.stderr and "Traceback" not in proc.stderr


def test_cuda_without_gpu_is_refused_up_front(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mar_fl.py"), "--dv", "cuda", "--run-dir",
                           str(tmp_path / "run"), "--wandb", "disabled"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dv cuda" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_counts_only_flags_given_and_different(tmp_path):
    from config_setup import save_config

    save_config(parse_config(["--np", "4", "--rounds", "20", "--run-dir", str(tmp_path), "--wandb", "disabled"]),
                str(tmp_path / "config.json"))
    same = parse_config(["--resume", str(tmp_path), "--np", "4", "--run-dir", str(tmp_path)])
    assert same.num_peers == 4 and same.rounds == 20  # a flag equal to the saved value is no change
    longer = parse_config(["--resume", str(tmp_path), "--rounds", "500"])
    assert longer.rounds == 500  # applied although 500 is the default
    with pytest.raises(ConfigError, match="--np cannot change"):
        parse_config(["--resume", str(tmp_path), "--np", "8"])  # 8 is the default, but it was given


def test_resume_on_another_host_and_rejoin(tmp_path):
    from config_setup import save_config

    save_config(parse_config(["--np", "4", "--run-dir", str(tmp_path), "--wandb", "disabled"]),
                str(tmp_path / "config.json"))
    part = parse_config(["--resume", str(tmp_path), "--peer-range", "2-3"])  # one node of a resumed multi-node run
    assert part.peer_range == (2, 4) and not part.primary()
    assert part.initial_peers == str(tmp_path / "bootstrap.json")
    again = parse_config(["--resume", str(tmp_path), "--peer-range", "0-0", "--rejoin"])
    assert again.rejoin and again.peer_range == (0, 1) and not again.primary()  # never the collector
    assert again.initial_peers == str(tmp_path / "bootstrap.json")
    with pytest.raises(ConfigError, match="--rejoin"):
        parse_config(["--resume", str(tmp_path), "--rejoin"])  # which peers?
    with pytest.raises(ConfigError, match="--rejoin"):
        parse_config(["--np", "4", "--peer-range", "0-0", "--rejoin", "--wandb", "disabled"])  # not a running run


def test_ipv4_hosts_and_concrete_announce_addresses_are_accepted():
    cfg = parse_config(["--host", "0.0.0.0", "--announce-host", "10.1.2.3", "--wandb", "disabled"])
    assert (cfg.host, cfg.announce_host) == ("0.0.0.0", "10.1.2.3")
    assert parse_config(["-sd", str(2**63 - 1), "--wandb", "disabled"]).seed == 2**63 - 1
    assert parse_config(["--np", "4", "--up", "25", "--wandb", "disabled"]).update_percent == 25


def test_help_shows_each_default_once():
    from config_setup import build_parser

    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("(default") <= 1, text
    assert "(default: 42)" in parser.format_help()  # a default the help text does not mention is still shown


def test_log_level_flag():
    assert parse_config(["--wandb", "disabled"]).log_level == "INFO"
    assert parse_config(["--log-level", "debug", "--wandb", "disabled"]).log_level == "DEBUG"
    with pytest.raises(ConfigError, match="--log-level"):
        parse_config(["--log-level", "chatty"])


def test_main_restores_the_signal_handlers_it_installs(monkeypatch, tmp_path):
    import signal

    import mar_fl

    class FakeLauncher:
        def __init__(self, *args, **kwargs):
            pass

        def run(self):
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, mine)  # main's own handler, meanwhile
            return "completed", 0

        shutdown = finish_wandb = lambda self, *args: None
        write_summary = lambda self, status: {}  # noqa: E731

    mine = lambda signum, frame: None  # noqa: E731
    before = {s: signal.signal(s, mine) for s in mar_fl.HANDLED_SIGNALS}
    try:
        cfg = parse_config(["--wandb", "disabled", "--run-dir", str(tmp_path)])
        monkeypatch.setattr(mar_fl, "_pre_start", lambda argv: (cfg, str(tmp_path), {}, False, 0, None))
        monkeypatch.setattr(mar_fl, "Launcher", FakeLauncher)
        assert mar_fl.main([]) == 0
        assert all(signal.getsignal(s) is mine for s in mar_fl.HANDLED_SIGNALS)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("argv,words", [
    (["--aggregation", "ring"], "--aggregation"),
    (["--aggregation", "fedavg", "--kd"], "--kd"),
    (["--aggregation", "gossip", "--dp"], "--dp"),
    (["--aggregation", "gossip", "--gossip-peers", "0"], "--gossip-peers"),
    (["--gossip-peers", "3"], "--gossip-peers"),
    (["--gossip-weighting", "staleness"], "--gossip-weighting"),
])
def test_baseline_combinations_that_mean_nothing_are_refused(argv, words):
    with pytest.raises(ConfigError, match=words):
        parse_config([*argv, "--wandb", "disabled"])


def test_baselines_compose_with_dp_where_the_accountant_holds():
    for aggregation in ("mar", "rdfl", "fedavg"):
        cfg = parse_config(["--aggregation", aggregation, "--dp", "--nm", "0.5", "--np", "16", "--wandb", "disabled"])
        assert cfg.aggregation == aggregation and cfg.dp
    cfg = parse_config(["--aggregation", "gossip", "--gossip-peers", "3", "--gossip-weighting", "staleness",
                        "--wandb", "disabled"])
    assert (cfg.gossip_peers, cfg.gossip_weighting) == (3, "staleness")


@pytest.mark.parametrize("argv", [["--aggregation-p", "50"], ["--matchmaking", "5"], ["--group", "4"],
                                  ["--test-p", "aggregators"], ["--accuracy", "50"], ["--seed=4", "--num", "4"]])
def test_flag_prefixes_are_not_accepted(argv):
    with pytest.raises(ConfigError) as err:
        parse_config(argv + ["--wandb", "disabled"])
    assert argv[-2] in str(err.value)


def test_every_flag_name_and_alias_still_works():
    from config_setup import _percent_list, build_parser

    parser = build_parser()
    checked = 0
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        sample = action.choices[0] if action.choices else "50" if action.type in (int, float, _percent_list) else "x"
        for name in action.option_strings:
            args = vars(parser.parse_args([name] if action.nargs == 0 else [name, sample]))
            expected = action.const if action.nargs == 0 else (action.type or str)(sample)
            assert args[action.dest] == expected, name
            checked += 1
    assert checked > 80  # short names, long aliases and the single-dash -sd


def test_cli_refuses_an_abbreviated_flag(tmp_path, no_new_p2pd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mar_fl.py"), "--matchmaking", "5", "--run-dir",
                           str(tmp_path / "run"), "--wandb", "disabled"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--matchmaking" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_grouping_and_evaluation_flags():
    cfg = parse_config(["--wandb", "disabled"])
    assert (cfg.grouping, cfg.test_peers, cfg.test_split, cfg.accuracy_targets) == ("packed", "all", "iid", ())
    cfg = parse_config(["--grouping", "reference", "--test-peers", "aggregators", "--sp", "dirichlet",
                        "--test-split", "dirichlet", "--accuracy-targets", "50,97.5", "--wandb", "disabled"])
    assert (cfg.grouping, cfg.test_peers, cfg.test_split) == ("reference", "aggregators", "dirichlet")
    assert cfg.accuracy_targets == (50.0, 97.5)
    assert "reference" in os.path.basename(cfg.run_dir)  # two runs that differ only in grouping get two names


@pytest.mark.parametrize("argv,flag", [
    (["--grouping", "random"], "--grouping"),
    (["--test-peers", "some"], "--test-peers"),
    (["--test-split", "dirichlet"], "--test-split"),  # needs --sp dirichlet
    (["--test-split", "label"], "--test-split"),
    (["--accuracy-targets", "0"], "--accuracy-targets"),
    (["--accuracy-targets", "101"], "--accuracy-targets"),
    (["--accuracy-targets", "nan"], "--accuracy-targets"),
    (["--accuracy-targets", "50,x"], "--accuracy-targets"),
    (["--accuracy-targets", "50,50"], "--accuracy-targets"),
])
def test_grouping_and_evaluation_flags_refuse_bad_values(argv, flag):
    with pytest.raises(ConfigError) as err:
        parse_config(argv + ["--wandb", "disabled"])
    assert flag in str(err.value)


def test_accuracy_targets_survive_config_json_and_may_change_on_resume(tmp_path):
    import json

    from config_setup import config_from_json, save_config

    cfg = parse_config(["--np", "4", "--accuracy-targets", "50,90", "--grouping", "reference", "--run-dir",
                        str(tmp_path), "--wandb", "disabled"])
    save_config(cfg, str(tmp_path / "config.json"))
    assert config_from_json(json.loads((tmp_path / "config.json").read_text())) == cfg
    resumed = parse_config(["--resume", str(tmp_path), "--accuracy-targets", "95"])
    assert resumed.accuracy_targets == (95.0,) and resumed.grouping == "reference"
    with pytest.raises(ConfigError, match="--grouping cannot change"):
        parse_config(["--resume", str(tmp_path), "--grouping", "packed"])
    with pytest.raises(ConfigError, match="accuracy_targets"):
        config_from_json({**cfg.to_json(), "accuracy_targets": ["50"]})


def test_main_warns_once_when_groups_outgrow_gs(monkeypatch, tmp_path, capsys):
    import mar_fl

    class FakeLauncher:
        def __init__(self, *args, **kwargs):
            pass

        def run(self):
            return "completed", 0

        shutdown = finish_wandb = lambda self, *args: None
        write_summary = lambda self, status: {"best_test_accuracy": None, "final_test_accuracy": None,  # noqa: E731
                                              "stop_reason": None, "rounds": 0, "wall_seconds": 0.0,
                                              "failed_steps": 0, "failed_peers": []}

    cfg = parse_config(["--np", "125", "--gs", "4", "--gk", "3", "--wandb", "disabled", "--run-dir", str(tmp_path)])
    monkeypatch.setattr(mar_fl, "_pre_start", lambda argv: (cfg, str(tmp_path), {}, True, 0, None))
    monkeypatch.setattr(mar_fl, "Launcher", FakeLauncher)
    monkeypatch.setattr(mar_fl, "write_plots", lambda run_dir: None)
    assert mar_fl.main([]) == 0
    err = capsys.readouterr().err
    expected = "warning: --np 125 with --gs 4 --gk 3 makes groups of up to 8 peers (not 4); --gk 4 keeps them at 4-5"
    assert err.count("warning: ") == 1 and expected in err.splitlines()
