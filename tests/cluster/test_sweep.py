"""slm/cluster/sweep.py: a grid (--grid and a yaml's sweep: block) expanded into the tasks of a suite array, their
run_names, the checks at submission, and the --dry-run / --count / --task outputs the job scripts read (the arrays
themselves run in tests/cluster/test_jobs.py); and a grid trained on this machine (`--local -j K`), stopped by Ctrl-C
and resumed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slm.cli import main as slm_main
from slm.cluster.sweep import expand, main, parse_grid, split_values
from slm.core.config import load_config
from slm.core.errors import SlmError

from helpers import REPO, Hold, Started, assert_bitwise_equal, final_state, run_cmd, train, write_yaml

NO_SHARDS = Path("/no/shards")  # the configs load without them: nothing here trains


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "tiny.yaml", NO_SHARDS)


def names(tasks) -> list[str]:
    return [t.run_name for t in tasks]


def test_a_2x2_grid_is_four_tasks_first_axis_slowest_each_with_its_combination(tiny):
    tasks = expand([str(tiny)], ["max_duration=8ba"], ["seed=0,1", "optimizer.lr=1e-3,3e-3"])
    assert names(tasks) == ["tiny_seed0_lr1e-3", "tiny_seed0_lr3e-3", "tiny_seed1_lr1e-3", "tiny_seed1_lr3e-3"]
    assert tasks[2].args == [str(tiny), "max_duration=8ba", "seed=1", "optimizer.lr=1e-3", "run_name=tiny_seed1_lr1e-3"]
    for task in tasks:  # what training will load: the combination, the override, the derived run_name
        cfg = load_config(list(task.configs), list(task.overrides))
        combination = dict(task.combination)
        assert (cfg.run_name, cfg.max_duration) == (task.run_name, "8ba")
        assert cfg.seed == int(combination["seed"]) and cfg.optimizer.lr == float(combination["optimizer.lr"])


def test_without_a_grid_each_yaml_is_one_task_with_the_arguments_as_given(tmp_path, tiny):
    other = write_yaml(tmp_path / "other.yaml", NO_SHARDS, base="demo-mamba.yaml")
    tasks = expand([str(tiny), str(other)], ["max_duration=8ba"])
    assert [t.args for t in tasks] == [[str(tiny), "max_duration=8ba"], [str(other), "max_duration=8ba"]]
    assert names(tasks) == ["tiny", "other"]  # what training derives itself from the stem
    assert [t.args for t in expand([str(tiny)], ["run_name=mine"])] == [[str(tiny), "run_name=mine"]]


def test_run_name_prefix_is_the_name_the_yaml_would_train_under(tmp_path, tiny):
    assert names(expand([str(tiny)], ["run_name=lr-sweep"], ["seed=0,1"])) == ["lr-sweep_seed0", "lr-sweep_seed1"]
    named = tmp_path / "named.yaml"
    named.write_text(f"base: {tiny}\nrun_name: baseline\n")
    assert names(expand([str(named)], [], ["seed=3"])) == ["baseline_seed3"]  # one value: still in the name
    composed = expand([[str(tiny), str(tmp_path / "named.yaml")]], ["run_name=x"], ["seed=1"])
    assert composed[0].configs == (str(tiny), str(named)) and composed[0].run_name == "x_seed1"
    stems = tmp_path / "cool.yaml"
    stems.write_text("max_duration: 8ba\n")
    assert names(expand([[str(tiny), str(stems)]], [], ["seed=1"])) == ["tiny+cool_seed1"]  # as load_config


def test_keys_sharing_their_last_component_are_named_in_full_and_values_made_safe(tiny):
    tasks = expand([str(tiny)], [], ["scheduler.warmup=2ba", "hub.retries=1", "data.train.remote=s3://b/x,hf://d/y"])
    assert tasks[0].run_name == "tiny_warmup2ba_retries1_remotes3-b-x"
    same_last = expand([str(tiny)], [], ["data.train.local=/a/b", "data.eval.local=c..d"])
    assert same_last[0].run_name == "tiny_data.train.local-a-b_data.eval.localc.d"
    betas = expand([str(tiny)], [], ["optimizer.betas=[0.9,0.95],[0.9,0.99]"])  # commas in brackets stay
    assert names(betas) == ["tiny_betas0.9-0.95", "tiny_betas0.9-0.99"]
    assert load_config(list(betas[1].configs), list(betas[1].overrides)).optimizer.betas == [0.9, 0.99]


def test_split_values_keeps_bracketed_commas():
    assert split_values("1,[2,3],{a: 4, b: 5},x") == ["1", "[2,3]", "{a: 4, b: 5}", "x"]
    assert parse_grid(["seed=0,1", "optimizer.lr=1e-3"]) == {"seed": ["0", "1"], "optimizer.lr": ["1e-3"]}


def test_a_sweep_block_in_the_yaml_chain_and_the_grid_given_with_it(tmp_path, tiny):
    parent = tmp_path / "parent.yaml"
    parent.write_text(f"base: {tiny}\nsweep:\n  seed: [1, 2]\n  scheduler: {{warmup: [2ba, 4ba]}}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nsweep:\n  optimizer.lr: [1.0e-3, 3.0e-3]\n")
    tasks = expand([str(child)])
    assert len(tasks) == 8 and tasks[0].combination == (("seed", "1"), ("scheduler.warmup", "2ba"),
                                                         ("optimizer.lr", "0.001"))
    assert tasks[-1].run_name == "child_seed2_warmup4ba_lr0.003"
    cfg = load_config(list(tasks[-1].configs), list(tasks[-1].overrides))  # the schema takes the block as it is
    assert cfg.seed == 2 and cfg.scheduler.warmup == "4ba" and cfg.optimizer.lr == 0.003
    assert cfg.sweep == {"seed": [1, 2], "scheduler": {"warmup": ["2ba", "4ba"]}, "optimizer.lr": [0.001, 0.003]}

    # --grid replaces the block's values of its keys and adds its own axes; an override pins a key of the block
    both = expand([str(child)], ["optimizer.lr=0.01"], ["seed=7", "global_batch_size=4,8"])
    assert names(both) == [f"child_seed7_warmup{w}_global_batch_size{b}" for w in ("2ba", "4ba") for b in (4, 8)]
    assert all("optimizer.lr=0.01" in t.overrides for t in both)
    # a yaml without a block beside it: only the grid
    assert names(expand([str(child), str(tiny)], ["seed=5", "scheduler.warmup=1ba"], ["optimizer.lr=1,2"]))[-2:] == \
        ["tiny_lr1", "tiny_lr2"]


def test_yaml_values_become_overrides_that_give_them_back(tmp_path, tiny):
    block = tmp_path / "values.yaml"
    block.write_text(f"base: {tiny}\nsweep:\n  logging.wandb.project: ['true', 'null', plain]\n"
                     "  optimizer.fused: [true, false]\n")
    tasks = expand([str(block)])
    assert tasks[0].combination == (("logging.wandb.project", '"true"'), ("optimizer.fused", "true"))
    assert names(tasks)[:3] == ["values_projecttrue_fusedtrue", "values_projecttrue_fusedfalse",
                                "values_projectnull_fusedtrue"]
    got = [load_config(list(t.configs), list(t.overrides)) for t in tasks[::2]]
    assert [(c.logging.wandb.project, c.optimizer.fused) for c in got] == [("true", True), ("null", True),
                                                                          ("plain", True)]


@pytest.mark.parametrize(("grid", "overrides", "yaml", "message"), [
    (["seed"], [], "", "--grid 'seed' is not KEY=V1,V2,...: e.g. --grid optimizer.lr=1e-3,3e-3"),
    (["=1,2"], [], "", "--grid '=1,2' is not KEY=V1,V2,..."),
    (["seed="], [], "", "--grid seed=: 'seed' has an empty value"),
    (["seed=0,,1"], [], "", "--grid seed=0,,1: 'seed' has an empty value"),
    (["seed=0,1,0"], [], "", "--grid seed=0,1,0: 'seed' lists the value 0 twice"),
    (["seed=0", "seed=1"], [], "", "--grid seed is given twice: list all its values in one --grid seed=V1,V2,..."),
    (["run_name=a,b"], [], "", "'run_name' cannot be swept (give run_name=PREFIX to name the runs PREFIX_...)"),
    (["sweep.seed=1,2"], [], "", "'sweep.seed' cannot be swept"),
    (["opt/lr=1,2"], [], "", "'opt/lr' is not a config key"),
    (["seed=1,2"], ["seed=3"], "", "'seed' is both swept (--grid) and set (seed=3): drop one"),
    (["optimizer.lr=1,2"], ["optimizer={lr: 1}"], "", "'optimizer.lr' is both swept (--grid) and set"),
    (["seed=a/b,a:b"], [], "", "tasks 0 and 1 would both train run_name 'tiny_seeda-b'"),
    ([], [], "sweep: [1, 2]\n", "must map keys to lists of values, e.g. sweep: {optimizer.lr: [1.0e-3, 3.0e-3]}"),
    ([], [], "sweep: {seed: 3}\n", "'seed' must list its values, e.g. seed: [3, ...], not 3"),
    ([], [], "sweep: {seed: []}\n", "'seed' has no values"),
    ([], [], "sweep: {run_name: [a, b]}\n", "'run_name' cannot be swept"),
    ([], ["run_name=a\nb"], "", "run_name 'a\nb' is not a safe folder name"),
])
def test_bad_grids_fail_in_one_line(tmp_path, tiny, grid, overrides, yaml, message):
    config = tiny
    if yaml:
        config = tmp_path / "swept.yaml"
        config.write_text(f"base: {tiny}\n{yaml}")
    with pytest.raises(SlmError) as e:
        expand([str(config)], overrides, grid)
    assert message in str(e.value)


def test_two_yamls_of_one_name_are_refused(tmp_path, tiny):
    (tmp_path / "b").mkdir()
    twin = write_yaml(tmp_path / "b" / "tiny.yaml", NO_SHARDS)
    with pytest.raises(SlmError, match="tasks 0 and 1 would both train run_name 'tiny': give the yamls distinct"):
        expand([str(tiny), str(twin)])
    with pytest.raises(SlmError, match="tasks 0 and 2 would both train run_name 'x_seed1'"):
        expand([str(tiny), str(twin)], ["run_name=x"], ["seed=1,2"])


def test_dry_run_prints_the_table_and_checks_every_config(tiny, capsys):
    args = [str(tiny), "--grid", "seed=0,1", "max_duration=8ba", "--grid=optimizer.lr=1e-3,3e-3"]
    assert main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4 tasks (Slurm: sbatch --array=0-3; SGE: qsub -t 1-4)"
    assert out[1].split() == ["task", "run_name", "config", "combination"]
    assert out[3].split() == ["1", "tiny_seed0_lr3e-3", str(tiny), "seed=0", "optimizer.lr=3e-3"]
    assert len(out) == 6 and out[2].index("tiny_seed0") == out[1].index("run_name")  # columns line up

    assert main([str(tiny), "--grid", "optimizer.lrr=1,2"]) == 1  # a typo fails when the sweep is listed...
    err = capsys.readouterr().err.strip()
    assert err == ("slm sweep: error: task 0 (tiny_lrr1): unknown config key 'optimizer.lrr' in the command line "
                   "(optimizer.lrr=1); did you mean 'optimizer.lr'?")
    assert main(["--count", str(tiny), "--grid", "optimizer.lr=1,-2"]) == 1  # ... or counted: at submission
    assert "task 1 (tiny_lr-2): config key 'optimizer.lr' must be positive, got -2" in capsys.readouterr().err
    assert main(["--task", "0", str(tiny), "--grid", "optimizer.lrr=1,2"]) == 0  # a task does not check: fast
    capsys.readouterr()


def test_runs_sharing_a_folder_are_refused(tmp_path, capsys):
    fixed = write_yaml(tmp_path / "fixed.yaml", NO_SHARDS)
    fixed.write_text(fixed.read_text().replace("/ckpt/{run_name}", "/ckpt/all"))
    assert main(["--count", str(fixed), "--grid", "seed=1,2"]) == 1
    assert f"tasks 0 and 1 would both write {tmp_path}/ckpt/all: put {{run_name}} in save_folder" in \
        capsys.readouterr().err


def test_count_and_task_are_what_the_job_scripts_read(tiny, capsys):
    args = [str(tiny), "--grid", "seed=0,1", "max_duration=8ba", "--grid", "optimizer.lr=1e-3,3e-3"]
    assert main(["--count", *args]) == 0 and capsys.readouterr().out == "4\n"
    tasks = expand([str(tiny)], ["max_duration=8ba"], ["seed=0,1", "optimizer.lr=1e-3,3e-3"])
    for i, task in enumerate(tasks):
        assert main([*args, "--task", str(i)]) == 0
        assert capsys.readouterr().out.splitlines() == task.args  # the same every time: each task resumes its run
    assert main([*args, "--task", "4"]) == 1
    assert capsys.readouterr().err.strip() == ("slm sweep: error: task 4 (counting from 0) does not exist: the sweep "
                                               "has 4 tasks (submit with sbatch --array=0-3, or qsub -t 1-4)")


def test_slm_sweep_and_python_m_slm_sweep(tiny, capsys):
    assert slm_main(["sweep", str(tiny), "--grid", "seed=0,1", "--count"]) == 0  # options after the yaml, too
    assert capsys.readouterr().out == "2\n"
    assert slm_main(["sweep"]) == 1
    assert capsys.readouterr().err.strip() == "slm sweep: error: no config given: name at least one CONFIG.yaml"
    proc = subprocess.run([sys.executable, "-m", "slm.cluster.sweep", "--task", "1", "--grid", "seed=0,1", str(tiny)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout.splitlines() == [str(tiny), "seed=1", "run_name=tiny_seed1"]
    proc = subprocess.run([sys.executable, "-c", "import sys, slm.cluster.sweep; sys.exit(any(m.startswith(('torch', "
                           "'composer')) for m in sys.modules))"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, "slm.cluster.sweep imports torch or composer at import"


def test_several_axes_after_one_grid_flag(tiny, capsys):
    """The issue's spelling: `--grid optimizer.lr=1e-3,3e-3 seed=0,1`; a one-value key=value after them is an
    override, as is a bracketed list."""
    args = [str(tiny), "--grid", "optimizer.lr=1e-3,3e-3", "seed=0,1", "optimizer.betas=[0.8,0.9]", "max_duration=8ba"]
    assert main(["--task", "3", *args]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tiny), "optimizer.betas=[0.8,0.9]", "max_duration=8ba",
                                                    "optimizer.lr=3e-3", "seed=1", "run_name=tiny_lr3e-3_seed1"]


def test_per_device_groups_the_tasks_into_array_tasks_joined_by_next(tiny, capsys):
    """--per-device 2 over 3 tasks: 2 array tasks, the first training tasks 0 and 1 side by side, the second task 2."""
    args = [str(tiny), "--grid", "seed=0,1,2", "--per-device", "2"]
    tasks = expand([str(tiny)], [], ["seed=0,1,2"])
    assert main(["--count", *args]) == 0 and capsys.readouterr().out == "2\n"
    assert main(["--task", "0", *args]) == 0
    assert capsys.readouterr().out.splitlines() == [*tasks[0].args, "--next", *tasks[1].args]
    assert main(["--task", "1", *args]) == 0 and capsys.readouterr().out.splitlines() == tasks[2].args
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("3 tasks, 2 at once on each array task's device: 2 array tasks "
                                                       "(Slurm: sbatch --array=0-1; SGE: qsub -t 1-2)")
    assert main(["--task", "2", *args]) == 1
    assert "task 2 (counting from 0) does not exist: the sweep has 2 tasks" in capsys.readouterr().err
    assert main(["--count", *args[:-1], "0"]) == 1
    assert capsys.readouterr().err.strip() == "slm sweep: error: --per-device 0: give at least 1 run a device"


@pytest.mark.train
@pytest.mark.beside  # four tiny runs, two at a time
def test_a_local_sweep_runs_two_at_a_time_stops_on_ctrl_c_and_a_second_call_resumes(tmp_path, shards):
    """`slm sweep tiny.yaml --grid seed=42,7 optimizer.lr=3e-3,1e-3 --local -j 2`: the first two runs held at the end
    of batch 4 when the sweep gets a Ctrl-C: both stop with a checkpoint, the other two never start, exit 130. The
    same command resumes the two and trains the others; the run of the yaml's own values ends bitwise equal to it
    trained directly. A third call skips all four."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=ref", "max_duration=8ba")
    cmd = [str(Path(sys.executable).parent / "slm"), "sweep", str(config), "--grid", "seed=42,7",
           "optimizer.lr=3e-3,1e-3", "max_duration=8ba", "--local", "-j", "2", "--logs", str(tmp_path / "logs")]
    names = ["tiny_seed42_lr3e-3", "tiny_seed42_lr1e-3", "tiny_seed7_lr3e-3", "tiny_seed7_lr1e-3"]
    hold = Hold(tmp_path / "hold", 4)
    proc = Started(cmd, env=hold.env)
    try:
        hold.wait(proc, processes=2)
        proc.send_signal(signal.SIGINT)
        hold.release()
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "slm sweep: 4 runs on this machine, 2 at a time (CPU cores" in stderr, stderr[-3000:]
    for name in names[:2]:
        assert f"slm sweep: {name}: stopped at batch" in stderr, stderr[-3000:]
        assert 4 <= final_state(tmp_path / "ckpt" / name)["timestamp"]["Timestamp"]["batch"] < 8
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["ref", *sorted(names[:2])]

    again = run_cmd(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "slm sweep: all 4 runs finished (4 trained now)" in again.stderr, again.stderr[-3000:]
    for name in names:
        assert final_state(tmp_path / "ckpt" / name)["timestamp"]["Timestamp"]["batch"] == 8
    assert "resumed at batch" in (tmp_path / "logs" / f"{names[0]}.log").read_text()
    assert_bitwise_equal(final_state(tmp_path / "ckpt" / "ref"), final_state(tmp_path / "ckpt" / names[0]))

    last = run_cmd(cmd)
    assert last.returncode == 0 and last.stderr.count("skipped: finished before") == 4, last.stderr[-3000:]


def test_a_local_sweep_reads_a_run_folder_it_cannot_trust_as_not_finished(tmp_path):
    """`--local`'s skip check reads run-state.json and config.yaml through the checked readers: a link out of the
    folder, a state of another kind, a config naming a base yaml or a huge file all mean "not finished" (the run's
    own start then checks the folder), never a read outside it or a crash."""
    from slm.cluster.local import finished
    from slm.core.config import save_config
    from slm.core.run_folder import STATE_FILE

    config = write_yaml(tmp_path / "tiny.yaml", NO_SHARDS)
    cfg = load_config(config, ["run_name=r", "max_duration=16ba"])
    folder = cfg.folder
    folder.mkdir(parents=True)
    (tmp_path / "outside.json").write_text('{"state": "finished"}')
    save_config(cfg, tmp_path / "saved.yaml")
    save_config(load_config(config, ["run_name=r", "max_duration=8ba"]), tmp_path / "shorter.yaml")
    saved, shorter = (tmp_path / "saved.yaml").read_text(), (tmp_path / "shorter.yaml").read_text()
    cases = {
        "state links out": lambda: (folder / STATE_FILE).symlink_to(tmp_path / "outside.json"),
        "state of another kind": lambda: (folder / STATE_FILE).write_text('{"state": "done"}'),
        "state not JSON": lambda: (folder / STATE_FILE).write_text("{"),
        "huge state": lambda: (folder / STATE_FILE).write_bytes(b" " * 2**25 + b'{"state": "finished"}'),
        "config naming a base": lambda: ((folder / STATE_FILE).write_text('{"state": "finished"}'),
                                         (folder / "config.yaml").write_text(saved.replace("base: null",
                                                                                           "base: /etc/passwd"))),
        "another max_duration": lambda: ((folder / STATE_FILE).write_text('{"state": "finished"}'),
                                         (folder / "config.yaml").write_text(shorter)),
    }
    for name, plant in cases.items():
        for path in folder.iterdir():
            path.unlink()
        plant()
        assert finished(cfg) is False, name
    (folder / "config.yaml").write_text(saved)  # the honest folder: finished at this max_duration
    assert finished(cfg) is True
