"""Site configurations: the dry run of every site, validation before submission, the per-user file, the retry
policy, and PBS Pro's job status as Parsl's provider reads it. Needs no scheduler."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import parsl
import pytest
from parsl import bash_app
from parsl.app.errors import BashExitFailure
from parsl.config import Config
from parsl.executors import MPIExecutor, ThreadPoolExecutor
from parsl.executors.errors import BadStateException
from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost
from parsl.jobs.states import JobState
from parsl.launchers import SimpleLauncher
from parsl.providers.errors import SubmitException

import site_configs
from site_configs import batch
from tests.conftest import ROOT
from workflows import cli
from workflows.runconfig import LaunchConfig

WORKFLOW = "workflows/pretrain.py"
BATCH_SITES = ("frontier", "perlmutter", "lumi", "aurora", "polaris", "local-slurm")
ACCOUNTS = {"frontier": "ABC123", "lumi": "project_465000123", "aurora": "MatRIS", "polaris": "MatRIS"}


@pytest.fixture(autouse=True)
def no_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the per-user file into the test's directory, so the developer's own file cannot leak in."""
    config_home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    return config_home / "matris-janus" / "sites.yaml"


def run_cli(*args: str) -> tuple[int, str, str]:
    """`parsl-run` in this process (the subprocess form is tested once below; this one is fast)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def dry_run(site: str, tmp_path: Path, *settings: str) -> str:
    account = ["--set", f"site.account={ACCOUNTS[site]}"] if site in ACCOUNTS else []
    code, out, err = run_cli(WORKFLOW, "--site", site, "--run-dir", str(tmp_path / "run"), "--dry-run",
                             *account, *settings)  # fmt: skip
    assert code == 0, err
    assert not (tmp_path / "run").exists(), "a dry run must create nothing"
    return out


def two_nodes(ranks_per_node: int) -> list[str]:
    return ["--set", "launch.nodes=2", "--set", f"launch.ranks_per_node={ranks_per_node}",
            "--set", f"parallel.dp={2 * ranks_per_node}", "--set", "site.nodes_per_block=2"]  # fmt: skip


# --- what each centre's users would recognise -----------------------------------------------------


def test_frontier_dry_run_prints_the_olcf_script(tmp_path: Path):
    out = dry_run("frontier", tmp_path, *two_nodes(8))
    for line in (
        "#SBATCH --account=ABC123",
        "#SBATCH --partition=batch",
        "#SBATCH --nodes=2",
        "#SBATCH --time=120",
        "#SBATCH --network=disable_rdzv_get",
        "#SBATCH --exclusive",
        "export FI_CXI_RDZV_PROTO=alt_read",
        "export NCCL_SOCKET_IFNAME=hsn0",
        "--enable_mpi_mode  --mpi-launcher=srun",
        "PARSL_MPI_PREFIX=srun --ntasks 16 --ntasks-per-node 8 --nodelist <node1>,<node2> --nodes 2 "
        "-c7 --gpus-per-task=1 --gpu-bind=closest",
        'MASTER_ADDR=$(scontrol show node "${PARSL_MPI_NODELIST%%,*}"',
        "$PARSL_MPI_PREFIX python -m janus.train --config",
    ):
        assert line in out, line
    assert out.count("$ sbatch ") == 2  # the stage block and the training block
    assert "#SBATCH --cpus-per-task" not in out  # never cores_per_node with the MPIExecutor


def test_walltime_as_typed_on_the_command_line(tmp_path: Path):
    """``--set site.walltime=12:00:00`` reaches the schema as YAML's base-60 integer 43200."""
    out = dry_run(
        "frontier", tmp_path, "--set", "site.walltime=12:00:00", "--set", "site.nodes_per_block=200"
    )
    assert "#SBATCH --time=720" in out and "#SBATCH --nodes=200" in out
    assert "#SBATCH --time=120\n" in out  # the one-node stage block is cut to batch's 2 h for 1-91 nodes


def test_perlmutter_dry_run_asks_for_gpu_nodes(tmp_path: Path):
    out = dry_run("perlmutter", tmp_path, *two_nodes(4))
    for line in ("#SBATCH --constraint=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --qos=regular",
                 "srun --ntasks 8 --ntasks-per-node 4", "--cpu-bind=cores -c32"):  # fmt: skip
        assert line in out, line
    assert "#SBATCH --account" not in out  # NERSC charges the default project when none is given


def test_lumi_dry_run_binds_each_rank_next_to_its_gcd(tmp_path: Path):
    out = dry_run("lumi", tmp_path, *two_nodes(8))
    for line in ("#SBATCH --partition=standard-g", "#SBATCH --account=project_465000123",
                 "#SBATCH --gpus-per-node=8",
                 "--cpu-bind=mask_cpu:fe000000000000,fe00000000000000,fe0000,fe000000,fe,fe00,fe00000000,"
                 "fe0000000000"):  # fmt: skip
        assert line in out, line


def test_aurora_dry_run_prints_the_alcf_script(tmp_path: Path):
    out = dry_run("aurora", tmp_path, *two_nodes(12))
    for line in (
        "#PBS -l select=2:ncpus=208",
        "#PBS -l filesystems=home:flare",
        "#PBS -l place=scatter",
        "#PBS -l walltime=01:00:00",
        "$ qsub  -q debug -A MatRIS ",
        "module load frameworks",
        "export TMPDIR=/tmp",
        "PARSL_MPI_PREFIX=mpiexec -n 24 -ppn 12 -hosts <node1>,<node2> "
        "--cpu-bind=list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100",
        "MASTER_ADDR=${PARSL_MPI_NODELIST%%,*}",
        "MASTER_PORT=$((20000 + ${PBS_JOBID%%.*} % 20000))",
    ):
        assert line in out, line


def test_polaris_dry_run_selects_polaris_nodes(tmp_path: Path):
    out = dry_run("polaris", tmp_path, *two_nodes(4))
    for line in ("#PBS -l select=2:ncpus=64:ngpus=4:system=polaris", "#PBS -l filesystems=home:eagle",
                 "mpiexec -n 8 -ppn 4 -hosts <node1>,<node2> --cpu-bind=depth --depth=8"):  # fmt: skip
        assert line in out, line


def test_local_slurm_dry_run_needs_no_account(tmp_path: Path):
    out = dry_run("local-slurm", tmp_path, *two_nodes(1))
    assert "#SBATCH --partition=batch" in out and "#SBATCH --account" not in out
    assert "#SBATCH --exclusive" not in out  # blocks share the four loopback nodes
    assert "srun --ntasks 2 --ntasks-per-node 1 --nodelist <node1>,<node2> --nodes 2 --overcommit" in out


def test_local_dry_run_has_no_batch_script(tmp_path: Path):
    out = dry_run("local", tmp_path)
    assert "torch.distributed.run --standalone" in out and "#SBATCH" not in out and "#PBS" not in out


def test_dry_run_needs_no_scheduler_and_writes_nothing(tmp_path: Path):
    """The command users type, with no scheduler command on PATH at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    venv_bin = Path(shutil.which("parsl-run") or ROOT / ".venv/bin/parsl-run").parent
    for tool in ("sbatch", "sacct", "squeue", "qsub", "qstat"):
        assert not (venv_bin / tool).exists()
    env_path = f"{venv_bin}:/usr/bin:/bin"
    if any(Path(d, "sbatch").exists() for d in ("/usr/bin", "/bin")):
        env_path = str(venv_bin)  # this machine has Slurm: leave even /usr/bin out
    result = subprocess.run(
        [str(venv_bin / "parsl-run"), WORKFLOW, "--site", "frontier", "--run-dir", str(tmp_path / "run"),
         "--dry-run", "--set", "site.account=ABC123"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": env_path},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --account=ABC123" in result.stdout
    assert not (tmp_path / "run").exists()


# --- validation before submission -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("site", "settings", "expected"),
    [
        ("frontier", [], ["site.account is required on frontier"]),
        ("lumi", [], ["site.account is required on lumi"]),
        ("frontier", ["site.account=A", "site.walltime=03:00:00"],
         ["site.walltime 03:00:00", "02:00:00 limit", "site.partition 'batch'", "1-node"]),
        ("frontier", ["site.account=A", "site.walltime=12:00:01", "site.nodes_per_block=200"],
         ["site.walltime 12:00:01", "12:00:00 limit"]),
        ("frontier", ["site.account=A", "site.partition=extended", "site.nodes_per_block=65"],
         ["site.nodes_per_block=65", "64-node limit", "site.partition 'extended'"]),
        ("frontier", ["site.account=A", "site.partition=gpu"], ["site.partition 'gpu'", "batch, extended"]),
        ("perlmutter", ["site.qos=debug", "site.walltime=01:00:00"], ["site.walltime", "00:30:00 limit",
                                                                      "site.qos 'debug'"]),
        ("polaris", ["site.account=A", "site.partition=prod"],
         ["site.partition 'prod'", "at least 10 nodes"]),
        ("aurora", ["site.account=A", "site.stage_walltime=02:00:00"], ["site.stage_walltime 02:00:00"]),
        ("frontier", ["site.account=A", "site.walltime=2h"], ["site.walltime", "HH:MM:SS"]),
        ("frontier", ["site.account=A", "site.walltime=01:60:00"], ["site.walltime", "HH:MM:SS"]),
        ("frontier", ["site.account=A", "site.nodes_per_block=0"], ["site.nodes_per_block"]),
        ("frontier", ["site.account=A", "site.backend=gloo"], ["site.backend gloo"]),
        ("aurora", ["site.account=A", "site.filesystems=home;flare"], ["site.filesystems", "home;flare"]),
        ("frontier", ["site.account=A", "site.environment={1BAD: x}"], ["site.environment", "1BAD"]),
        ("frontier", ["site.account=A", "site.bogus=1"], ["unknown key 'bogus'"]),
        ("aurora", ["site.account=A", "site.qos=regular"], ["site.qos means nothing to pbs"]),
    ],
)  # fmt: skip
def test_invalid_site_settings_fail_naming_the_field(site, settings, expected, tmp_path: Path):
    args = [arg for setting in settings for arg in ("--set", setting)]
    code, out, err = run_cli(WORKFLOW, "--site", site, "--run-dir", str(tmp_path / "run"), "--dry-run", *args)
    assert code == 2 and out == ""
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("site", "settings", "expected"),
    [
        ("frontier", [*two_nodes(8)[:-2], "--set", "site.nodes_per_block=1"],
         ["launch.nodes asks for 2 nodes", "site.nodes_per_block=1", "wait forever"]),
        ("local-slurm",
         ["--set", "launch.nodes=3", "--set", "parallel.dp=3", "--set", "site.nodes_per_block=2"],
         ["launch.nodes asks for 3 nodes", "site.nodes_per_block=2"]),
        ("frontier", ["--set", "launch.ranks_per_node=16", "--set", "parallel.dp=16"],
         ["launch.ranks_per_node=16", "site.gpus_per_node=8"]),
        ("aurora", ["--set", "launch.ranks_per_node=13", "--set", "parallel.dp=13"],
         ["launch.ranks_per_node=13", "site.gpus_per_node=12"]),
        ("local-slurm", ["--set", "launch.ranks_per_node=3", "--set", "parallel.dp=3"],
         ["launch.ranks_per_node=3", "site.cores_per_node=2"]),
        ("local", ["--set", "launch.nodes=2", "--set", "parallel.dp=2"], ["launch.nodes is 2"]),
    ],
)  # fmt: skip
def test_training_that_does_not_fit_the_block_fails_before_submission(site, settings, expected, tmp_path):
    account = ["--set", f"site.account={ACCOUNTS[site]}"] if site in ACCOUNTS else []
    code, _, err = run_cli(WORKFLOW, "--site", site, "--dry-run", *account, *settings)
    assert code == 2
    for text in expected:
        assert text in err, (text, err)


def test_scaling_ladder_that_does_not_fit_the_block_fails_before_submission():
    code, _, err = run_cli("workflows/scaling.py", "--site", "local-slurm", "--dry-run",
                           "--set", "scaling.nodes=[1,2,4]", "--set", "site.nodes_per_block=2")  # fmt: skip
    assert code == 2 and "scaling.nodes asks for 4 nodes" in err and "site.nodes_per_block=2" in err


INJECTIONS = ["x;touch /tmp/pwned", "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "x\ntouch /tmp/pwned",
              "x && touch /tmp/pwned", "x|tee /tmp/pwned", "a b", "x'y", "x*"]  # fmt: skip


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize(
    "field",
    ["account", "partition", "qos", "constraint", "cpu_bind", "filesystems", "address", "stage_partition"],
)
def test_values_that_reach_a_script_cannot_inject_a_command(field: str, value: str):
    with pytest.raises(ValueError, match=f"site.{field}"):
        site_configs.resolve("frontier", {"account": "ABC123", field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("launcher_options", v) for v in INJECTIONS]
    + [("scheduler_options", v) for v in INJECTIONS if v != "a b"],  # '-l place=scatter' is one directive
)
def test_options_cannot_inject_a_command(field: str, value: str):
    with pytest.raises(ValueError, match=f"site.{field}"):
        site_configs.resolve("aurora", {"account": "A", field: ["--ok", value]})


def test_injection_through_the_command_line_is_refused(tmp_path: Path):
    code, _, err = run_cli(WORKFLOW, "--site", "frontier", "--dry-run", "--set", "site.account=x;rm -rf /")
    assert code == 2 and "site.account" in err and "not a valid name" in err


def test_environment_values_are_quoted_not_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    hostile = f"a'b $(touch {marker}) `touch {marker}`; touch {marker}\nnext"
    site = site_configs.resolve("frontier", {"account": "A", "environment": {"HOSTILE": hostile}})
    script = f'{batch.worker_init(site)}\nprintf %s "$HOSTILE"'  # what the batch script runs
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == hostile
    assert not marker.exists()


def test_local_site_exports_its_environment_to_training_and_stage_workers(tmp_path: Path):
    """The local site's training command and stage workers get ``environment``, quoted, not executed."""
    from site_configs import local

    marker = tmp_path / "pwned"
    hostile = f"a'b $(touch {marker}); touch {marker}"
    site = site_configs.resolve("local", {"environment": {"HOSTILE": hostile, "OMP_NUM_THREADS": "1"}})
    command = local.train_command(site, 1, 1, tmp_path / "janus.yaml")
    exports, torchrun = command.rsplit("; ", 1)
    assert "torch.distributed.run" in torchrun and "--nproc-per-node 1" in torchrun
    result = subprocess.run(
        ["bash", "-c", f'{exports}; printf %s "$HOSTILE|$OMP_NUM_THREADS"'], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout == f"{hostile}|1"
    worker_init = local.parsl_config(site, tmp_path).executors[0].provider.worker_init
    result = subprocess.run(
        ["bash", "-c", f'{worker_init}; printf %s "$HOSTILE"'], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout == hostile
    assert not marker.exists()


def test_run_directory_that_a_batch_script_cannot_carry_is_refused(tmp_path: Path):
    site = site_configs.resolve("local-slurm", {})
    with pytest.raises(ValueError, match="--run-dir"):
        batch.parsl_config(site, tmp_path / "my run;x")


# --- the per-user file ----------------------------------------------------------------------------


def test_user_file_sets_account_and_environment_and_run_config_wins(no_user_file: Path, tmp_path: Path):
    no_user_file.parent.mkdir(parents=True)
    no_user_file.write_text(
        "frontier:\n  account: FROMFILE\n  worker_init: module load rocm/6.4.1\n"
        "  environment: {EXTRA_VAR: '1'}\n"
    )
    site = site_configs.resolve("frontier", {})
    assert site.account == "FROMFILE" and site.worker_init == "module load rocm/6.4.1"
    assert site.environment["EXTRA_VAR"] == "1" and site.environment["NCCL_SOCKET_IFNAME"] == "hsn0"
    assert site_configs.resolve("frontier", {"account": "FROMRUN"}).account == "FROMRUN"

    code, out, err = run_cli(WORKFLOW, "--site", "frontier", "--dry-run")
    assert code == 0, err
    assert "#SBATCH --account=FROMFILE" in out and "module load rocm/6.4.1" in out and "EXTRA_VAR=1" in out


def test_sites_file_option_and_errors_name_the_file(tmp_path: Path):
    sites = tmp_path / "mine.yaml"
    sites.write_text("aurora:\n  account: MINE\n  walltime: 1 day\n")
    code, _, err = run_cli(WORKFLOW, "--site", "aurora", "--dry-run", "--sites-file", str(sites))
    assert code == 2 and str(sites) in err and "site.walltime" in err
    sites.write_text("aurora:\n  account: MINE\n")
    code, out, err = run_cli(WORKFLOW, "--site", "aurora", "--dry-run", "--sites-file", str(sites))
    assert code == 0 and "-A MINE" in out


# --- Parsl configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("name", BATCH_SITES)
def test_batch_sites_train_on_an_mpi_executor(name: str, tmp_path: Path):
    site = site_configs.resolve(name, {"account": ACCOUNTS.get(name)} if name in ACCOUNTS else {})
    config = site_configs.site_module(name).parsl_config(site, tmp_path)  # builds, runs no scheduler command
    executors = {e.label: e for e in config.executors}
    assert set(executors) == {"stages", "train"}
    train = executors["train"]
    assert isinstance(train, MPIExecutor) and isinstance(train.provider.launcher, SimpleLauncher)
    assert train.mpi_launcher == batch.MPI_LAUNCHER[site.scheduler]
    assert getattr(train.provider, "cores_per_node", None) is None
    assert train.provider.nodes_per_block == site.nodes_per_block and train.provider.init_blocks == 0
    assert config.retries == site.retries >= 1 and config.retry_handler is batch.retry_handler
    resources = site_configs.site_module(name).train_resources(site, LaunchConfig(nodes=1, ranks_per_node=1))
    assert resources["num_nodes"] == 1 and resources["ranks_per_node"] == 1


def test_pbs_launch_line_takes_its_rendezvous_from_the_task_nodes():
    """The launch line under bash, with a stand-in launcher that prints what the ranks would see."""
    site = site_configs.resolve("aurora", {"account": "A"})
    command = batch.train_command(site, 2, 12, Path("/lus/flare/run/train/janus.yaml"))
    env = {"PATH": os.environ["PATH"], "PARSL_MPI_NODELIST": "x4102c5s0b0n0,x4102c5s1b0n0",
           "PBS_JOBID": "1234.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov",
           "PARSL_MPI_PREFIX": "printenv MASTER_ADDR MASTER_PORT"}  # fmt: skip
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["x4102c5s0b0n0", str(20000 + 1234)]


# --- retries --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exception", "retried"),
    [
        (BashExitFailure("train", 2), False),  # janus.train: configuration or layout error
        (BashExitFailure("train", 1), True),  # a rank died (e.g. with its node)
        (BashExitFailure("train", 137), True),  # SIGKILL: out of memory or node lost
        (BashExitFailure("train", 143), True),  # SIGTERM: the block reached its walltime
        (ManagerLost(b"manager", "x4102c5s0b0n0"), True),  # the block vanished (walltime, node failure)
        (WorkerLost(7, "frontier01234"), True),
        (BadStateException(None, RuntimeError("blocks failed")), True),
        (SubmitException("parsl.train.block-0", "sbatch failed"), True),
        (ValueError("bad input data"), False),  # a stage app's own error is deterministic
    ],
)
def test_retry_handler_decisions(exception: BaseException, retried: bool):
    cost = batch.retry_handler(exception, {})
    assert (cost <= 1) is retried and (math.isinf(cost) is not retried)


def test_parsl_retries_a_lost_node_but_not_a_configuration_error(tmp_path: Path):
    """The handler in a real DataFlowKernel: exit 1 is retried up to the budget, exit 2 runs once."""

    @bash_app
    def exits(code: int, log: str) -> str:
        return f"echo try >> {log}; exit {code}"

    config = Config(executors=[ThreadPoolExecutor(label="train")], run_dir=str(tmp_path / "runinfo"),
                    retries=2, retry_handler=batch.retry_handler)  # fmt: skip
    with parsl.load(config):
        lost, bad = exits(1, str(tmp_path / "lost.log")), exits(2, str(tmp_path / "bad.log"))
        for future in (lost, bad):
            with pytest.raises(BashExitFailure):
                future.result()
    assert len((tmp_path / "lost.log").read_text().split()) == 3  # first try and two retries
    assert len((tmp_path / "bad.log").read_text().split()) == 1


# --- PBS Pro job status ---------------------------------------------------------------------------


def test_pbs_status_from_qstat_json(tmp_path: Path):
    """Submit two blocks through the Aurora provider with ``qsub`` stubbed, then read their states from a
    ``qstat -f -F json`` answer shaped like PBS Pro's (tests/pbs/qstat_f_F_json.json: running, queued,
    held, finished after its walltime, and one job that qstat no longer lists)."""
    site = site_configs.resolve("aurora", {"account": "ABC123"})
    provider = batch.parsl_config(site, tmp_path).executors[1].provider
    provider.script_dir = str(tmp_path)
    answer = (ROOT / "tests" / "pbs" / "qstat_f_F_json.json").read_text()
    ids = iter(["1234", "1235", "1236", "1230", "1199"])
    commands: list[str] = []

    def execute_wait(cmd: str, timeout: int | None = None) -> tuple[int, str, str]:
        commands.append(cmd)
        if cmd.startswith("qsub"):
            return 0, f"{next(ids)}.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov\n", ""
        return 0, answer, ""

    provider.execute_wait = execute_wait
    jobs = [provider.submit("process_worker_pool.py", 1, f"parsl.train.block-{i}") for i in range(5)]
    assert commands[0].startswith("qsub  -q debug -A ABC123 ")
    script = Path(commands[0].split()[-1]).read_text()
    assert "#PBS -l filesystems=home:flare" in script and "#PBS -l select=1:ncpus=208" in script

    states = [status.state for status in provider.status(jobs)]
    assert commands[-1] == "qstat -x -f -F json " + " ".join(jobs)
    assert states == [
        JobState.RUNNING,
        JobState.PENDING,
        JobState.HELD,
        JobState.COMPLETED,
        JobState.COMPLETED,
    ]
    json.loads(answer)  # the fixture is plain JSON, as qstat prints it
